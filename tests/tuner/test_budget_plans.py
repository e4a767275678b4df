"""Budget plans stored in NSNConfig: validation, JSON round trip, set_rank(flops=...) and its errors."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_llama

import nsn_peft
from nsn_peft import NSNConfig

TARGETS = ["up_proj", "gate_proj", "down_proj"]


def _plans(model_names):
    low = {n: 4 + i % 3 for i, n in enumerate(model_names)}
    high = {n: r + 8 for n, r in low.items()}
    return {0.5: low, "1.0": high}


def _model():
    base = tiny_llama()
    names = [f"model.layers.{i}.mlp.{t}" for i in range(2) for t in TARGETS]
    plans = _plans(names)
    model = get_peft_model(base, NSNConfig(target_modules=TARGETS, budget_plans=plans))
    return model, plans


def test_config_normalises_keys_and_rejects_bad_plans():
    config = NSNConfig(budget_plans={0.5: {"a": 2}, 1: {"a": 3}, "0.25000000001": {"a": 1}})
    assert list(config.budget_plans) == ["0.25", "0.5", "1"]
    assert config.budgets() == [0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="not nested: 'a' has rank 3 at budget 0.5 but 2 at the larger budget 1"):
        NSNConfig(budget_plans={0.5: {"a": 3}, 1.0: {"a": 2}})
    with pytest.raises(ValueError, match="cover different layers"):
        NSNConfig(budget_plans={0.5: {"a": 1}, 1.0: {"b": 2}})
    with pytest.raises(ValueError, match=r"FLOPs fraction in \(0, 1\]"):
        NSNConfig(budget_plans={1.5: {"a": 1}})
    with pytest.raises(ValueError, match="positive int"):
        NSNConfig(budget_plans={0.5: {"a": 0}})


def test_set_rank_flops_picks_the_planned_ranks(input_ids):
    model, plans = _model()
    model.set_rank(flops=0.5)
    assert nsn_peft.get_rank(model) == plans[0.5]
    nsn_peft.set_rank(model, flops=1.0)
    assert nsn_peft.get_rank(model) == plans["1.0"]
    with nsn_peft.at_rank(model, flops=0.5):
        assert nsn_peft.get_rank(model) == plans[0.5]
        with torch.no_grad():
            inside = model(input_ids).logits
    assert nsn_peft.get_rank(model) == plans["1.0"]
    model.set_rank(plans[0.5])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, inside)
    assert model.budget_plans() == {0.5: plans[0.5], 1.0: plans["1.0"]}


def test_unknown_budget_names_the_available_ones():
    model, _ = _model()
    with pytest.raises(
        ValueError, match="No budget plan for flops=0.3; this adapter has plans for the FLOPs budgets 0.5, 1"
    ):
        model.set_rank(flops=0.3)
    with pytest.raises(ValueError, match="exactly one"):
        model.set_rank(4, flops=0.5)
    plain = get_peft_model(tiny_llama(), NSNConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="stores none.*plan_budget_schedule"):
        plain.set_rank(flops=0.5)


def test_plan_must_match_the_layers():
    model = get_peft_model(
        tiny_llama(), NSNConfig(target_modules=TARGETS, budget_plans={0.5: {"model.layers.0.mlp.up_proj": 4}})
    )
    with pytest.raises(ValueError, match="does not match the model's NSN layers: no rank for"):
        model.set_rank(flops=0.5)


def test_budget_plans_round_trip_through_save_and_load(tmp_path, input_ids):
    model, plans = _model()
    model.set_rank(flops=0.5)
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    config = loaded.peft_config["default"]
    assert config.budget_plans == {"0.5": plans[0.5], "1": plans["1.0"]}
    assert nsn_peft.get_rank(loaded) == plans[0.5]  # comes back at the budget it was saved at
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, expected)
    loaded.set_rank(flops=1.0)
    assert nsn_peft.get_rank(loaded) == plans["1.0"]


def test_dense_model_context_reproduces_the_base_model(input_ids):
    base = tiny_llama()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, NSNConfig(max_rank=4))
    model.train()
    with torch.no_grad():
        reference_logits = reference(input_ids).logits
        with nsn_peft.dense_model(model):
            assert not model.training
            dense = model(input_ids).logits
        factored = model(input_ids).logits
    assert model.training
    torch.testing.assert_close(dense, reference_logits)
    assert not torch.allclose(factored, reference_logits, atol=1e-3)
    assert all(p.requires_grad for n, p in model.named_parameters() if "nsn_" in n)
