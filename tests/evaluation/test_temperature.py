"""fit_temperature / with_temperature: the temperature-scaled dense baseline."""

import pytest
import torch
from tiny_models import tiny_llama

from nsn_peft import fit_temperature, with_temperature


def _peaky_model_and_its_own_samples():
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # confident predictions: the NLL has a clear minimum in T
    torch.manual_seed(0)
    start = torch.randint(0, 101, (64, 1))
    with torch.no_grad():
        ids = model.generate(
            start,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=15,
            min_new_tokens=15,
            pad_token_id=0,
        )
    return model, ids


def test_the_fitted_temperature_of_samples_drawn_at_t1_is_1_and_follows_a_rescaling():
    model, ids = _peaky_model_and_its_own_samples()
    fitted = fit_temperature(model, ids, batch_size=16)
    assert fitted == pytest.approx(1.0, abs=0.12)
    with with_temperature(model, 1.5):  # logits already divided by 1.5: the fit undoes it
        assert fit_temperature(model, ids, batch_size=16) == pytest.approx(fitted / 1.5, rel=0.03)
    logits = model(input_ids=ids[:2]).logits
    with with_temperature(model, 2.0):
        torch.testing.assert_close(model(input_ids=ids[:2]).logits, logits / 2.0)
    torch.testing.assert_close(model(input_ids=ids[:2]).logits, logits)  # the hook is gone


def test_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="token ids"):
        fit_temperature(model, torch.randn(2, 8))
    with pytest.raises(ValueError, match="low < high"):
        fit_temperature(model, torch.zeros(2, 8, dtype=torch.long), low=2.0, high=1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        with with_temperature(model, 0.0):
            pass
