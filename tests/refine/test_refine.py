"""Calibration-trained compression: block-wise and end-to-end refinement against the dense model."""

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_gpt2, tiny_llama

import nsn_peft
from nsn_peft import NSNConfig
from nsn_peft.refine import (
    RefineConfig,
    choose_on_validation,
    compress_and_refine,
    find_blocks,
    nsn_factors,
    refine_blockwise,
    refine_end_to_end,
)
from nsn_peft.refine import stages as stages_module
from nsn_peft.training import distillation_loss


def _calibration(n=16, length=12, seed=0):
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(seed))


def _kl_to_dense(model, ids):
    with torch.no_grad():
        with nsn_peft.dense_model(model):
            teacher = model(input_ids=ids).logits
        return float(distillation_loss(model(input_ids=ids).logits, teacher))


def _nested_model(factory=tiny_llama):
    """Max rank 16 running at rank 6: the components above 6 must never change."""
    model = get_peft_model(factory(), NSNConfig(max_rank=16))
    model.set_rank(6)
    return model


def _snapshot(model):
    return {k: p.detach().clone() for k, p in nsn_factors(model).items()}


def _assert_shapes_and_tail_unchanged(model, before, rank):
    after = nsn_factors(model)
    assert {k: tuple(v.shape) for k, v in after.items()} == {k: tuple(v.shape) for k, v in before.items()}
    changed = False
    for name, value in after.items():
        old = before[name]
        if ".nsn_A." in name:
            torch.testing.assert_close(value[rank:], old[rank:], rtol=0, atol=0)
            changed |= not torch.equal(value[:rank], old[:rank])
        else:
            torch.testing.assert_close(value[:, rank:], old[:, rank:], rtol=0, atol=0)
    assert changed


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_blockwise_lowers_the_loss_and_keeps_shapes_and_nesting(factory):
    model = _nested_model(factory)
    calib = _calibration()
    before_kl = _kl_to_dense(model, calib)
    before = _snapshot(model)
    result = refine_blockwise(model, calib, epochs=8, lr=3e-2, batch_size=4, show_progress=False)
    assert result.blocks == len(find_blocks(model)[1]) == 2
    assert result.steps == 2 * 8 * 4 and result.tokens == calib.numel()
    assert all(a < b for a, b in zip(result.error_after, result.error_before))
    assert _kl_to_dense(model, calib) < before_kl
    _assert_shapes_and_tail_unchanged(model, before, 6)
    assert nsn_peft.get_rank(model) == dict.fromkeys(nsn_peft.get_rank(model), 6)


def test_end_to_end_lowers_the_calibration_loss_and_keeps_shapes_and_nesting():
    model = _nested_model()
    calib = _calibration()
    before_kl = _kl_to_dense(model, calib)
    before = _snapshot(model)
    result = refine_end_to_end(
        model, calib, tokens=calib.numel() * 6, lr=3e-2, batch_size=4, log_every=4, show_progress=False
    )
    assert result.steps == 24 and result.tokens == 24 * 4 * 12
    assert result.kl_history[-1]["kl"] < result.kl_history[0]["kl"]
    assert _kl_to_dense(model, calib) < 0.8 * before_kl
    _assert_shapes_and_tail_unchanged(model, before, 6)


def test_frozen_layers_and_base_weights_do_not_change():
    model = _nested_model()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "nsn_" not in n}
    frozen = "model.layers.0.mlp.up_proj"
    before = _snapshot(model)
    refine_end_to_end(model, _calibration(), lr=1e-2, batch_size=4, frozen=[frozen], show_progress=False)
    after = nsn_factors(model)
    for name in (f"{frozen}.nsn_A.default", f"{frozen}.nsn_B.default"):
        assert torch.equal(after[name], before[name])
    for name, param in model.named_parameters():
        if "nsn_" not in name:
            assert torch.equal(param, base_before[name]), name


def test_refinement_rejects_bad_inputs():
    model = _nested_model()
    with pytest.raises(ValueError, match="at least batch_size=8"):
        refine_blockwise(model, _calibration(n=4), show_progress=False)
    with pytest.raises(ValueError, match=r"\(sequences, seq_len\) tensor of token ids"):
        refine_end_to_end(model, torch.randn(4, 8), show_progress=False)
    with pytest.raises(ValueError, match="takes the dense model"):
        compress_and_refine(model, _calibration(), 0.5)
    with pytest.raises(ValueError, match="decide_after"):
        RefineConfig(decide_after="never")


def test_choose_on_validation_keeps_the_baseline_unless_strictly_better():
    model = get_peft_model(tiny_llama(), NSNConfig(max_rank=16))
    valid = _calibration(n=4, seed=3)
    winner, scores = choose_on_validation(model, {"uniform": 16, "mixed": 16}, valid, batch_size=4)
    assert winner == "uniform" and scores["uniform"] == scores["mixed"]
    winner, scores = choose_on_validation(model, {"uniform": 2, "mixed": 16}, valid, batch_size=4)
    assert scores["mixed"] < scores["uniform"] and winner == "mixed"
    winner, _ = choose_on_validation(model, {"uniform": 16, "mixed": 2}, valid, batch_size=4)
    assert winner == "uniform"


CONFIG = RefineConfig(
    batch_size=4,
    blockwise_epochs=2,
    blockwise_lr=1e-2,
    e2e_tokens=16 * 12 * 3,
    e2e_lr=1e-2,
    gradient_tokens=64,
    save_interval_s=0.0,
    log_every=2,
    validation_fraction=0.2,
)


def test_compress_and_refine_end_to_end(tmp_path, input_ids):
    base = tiny_llama()
    dense = copy.deepcopy(base)
    calib = _calibration(n=20)
    model, report = compress_and_refine(base, calib, 0.5, config=CONFIG, show_progress=False)
    assert report.allocation in ("mixed", "uniform") and set(report.candidates) == {"mixed", "uniform"}
    scores = {n: c["validation_nll_blockwise"] for n, c in report.candidates.items()}
    assert scores[report.allocation] <= scores["uniform"]  # never worse than uniform on validation
    assert report.calibration_tokens == 16 * 12 and report.validation_tokens == 4 * 12
    assert set(report.validation_nll) == {"dense", "init", "blockwise", "end_to_end"}
    assert sum(report.blockwise["error_after"]) < sum(report.blockwise["error_before"])
    kl = [r["kl"] for r in report.end_to_end["kl_history"]]
    assert kl[-1] < kl[0]
    assert report.end_to_end["tokens"] == CONFIG.e2e_tokens
    # factors truncated to the chosen ranks; the dense weights untouched
    assert nsn_peft.get_max_rank(model) == nsn_peft.get_rank(model) == report.ranks
    with torch.no_grad():
        with nsn_peft.dense_model(model):
            torch.testing.assert_close(model(input_ids).logits, dense(input_ids).logits)
        expected = model(input_ids).logits
    # the adapter saves and loads at these shapes
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, expected)


def test_forced_uniform_and_fraction_checks():
    model, report = compress_and_refine(
        tiny_llama(),
        _calibration(n=20),
        0.5,
        allocation="uniform",
        config=RefineConfig(batch_size=4, blockwise_epochs=1, e2e_tokens=0),
        show_progress=False,
    )
    assert report.allocation == "uniform" and report.end_to_end is None and set(report.candidates) == {"uniform"}
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        compress_and_refine(tiny_llama(), _calibration(), 1.0)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    calib = _calibration(n=20)
    reference, _ = compress_and_refine(tiny_llama(), calib, 0.5, config=CONFIG, show_progress=False)
    expected = {k: v.detach().clone() for k, v in nsn_factors(reference).items()}

    original = stages_module.refine_end_to_end
    state_dir = tmp_path / "state"

    def crashing(*args, on_interval=None, **kwargs):
        def interval(steps, optimizer, record):
            on_interval(steps, optimizer, record)
            if steps >= 4:
                raise KeyboardInterrupt("simulated crash")

        return original(*args, on_interval=interval, **kwargs)

    monkeypatch.setattr(stages_module, "refine_end_to_end", crashing)
    with pytest.raises(KeyboardInterrupt):
        compress_and_refine(tiny_llama(), calib, 0.5, config=CONFIG, state_dir=state_dir, show_progress=False)
    saved = json.loads((state_dir / "refine_state.json").read_text())
    assert saved["stage"] == "end_to_end" and saved["step"] == 4
    assert {p.name for p in state_dir.iterdir()} == {
        "refine_state.json",
        "factors.safetensors",
        "optimizer.safetensors",
    }
    monkeypatch.setattr(stages_module, "refine_end_to_end", original)
    resumed, report = compress_and_refine(
        tiny_llama(), calib, 0.5, config=CONFIG, state_dir=state_dir, show_progress=False
    )
    assert report.resumed
    for name, value in nsn_factors(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
    assert json.loads((state_dir / "refine_state.json").read_text())["stage"] == "done"
    # a finished state rebuilds the result without training
    again, _ = compress_and_refine(tiny_llama(), calib, 0.5, config=CONFIG, state_dir=state_dir, show_progress=False)
    for name, value in nsn_factors(again).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
    # another calibration set does not silently reuse the state
    with pytest.raises(ValueError, match="other inputs"):
        compress_and_refine(
            tiny_llama(), _calibration(n=20, seed=9), 0.5, config=CONFIG, state_dir=state_dir, show_progress=False
        )
