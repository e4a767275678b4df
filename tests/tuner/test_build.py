"""Adapting a dense model through the library call the CLI uses, and what the adapted model holds."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_llama

import nsn_peft
from nsn_peft import NSNConfig
from nsn_peft.errors import UnknownModulesError


def test_adapt_model_is_get_peft_model_with_the_base_recorded(input_ids):
    config = dict(target_modules=["q_proj", "down_proj"], max_rank=8)
    model = nsn_peft.adapt_model(tiny_llama(), NSNConfig(**config), base_model_name_or_path="org/base")
    reference = get_peft_model(tiny_llama(), NSNConfig(**config)).eval()
    assert not model.training
    assert model.peft_config["default"].base_model_name_or_path == "org/base"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference(input_ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_unknown_module_names_raise_by_type_before_any_work(field):
    with pytest.raises(UnknownModulesError, match=rf"{field}: qkv_proj match\(es\) no linear layer .*q_proj"):
        nsn_peft.adapt_model(tiny_llama(), NSNConfig(**{field: ["qkv_proj"]}))


def test_adapter_summary_counts_layers_ranks_and_flops():
    model = nsn_peft.adapt_model(tiny_llama(), NSNConfig(target_modules=["up_proj", "down_proj"], max_rank=8))
    model.set_rank(4)
    summary = nsn_peft.adapter_summary(model)
    assert summary["layers"] == 4
    assert summary["max_rank_counts"] == {"8": 4} and summary["active_rank_counts"] == {"4": 4}
    assert summary["factor_params"] < summary["targeted_dense_params"]
    assert summary["targeted_flops_fraction"] == pytest.approx(model.estimate_flops().targeted_fraction)
