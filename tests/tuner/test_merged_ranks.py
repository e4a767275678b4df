"""A merged model computes the ranks it reports, whichever way the rank was set."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_llama

import nsn_peft
from nsn_peft import NSNConfig, RankSpec

TARGETS = ["up_proj", "gate_proj", "down_proj", "o_proj"]
NAMES = [f"model.layers.{i}.{'self_attn' if t == 'o_proj' else 'mlp'}.{t}" for i in range(2) for t in TARGETS]
LOW = {n: 4 + i % 3 for i, n in enumerate(NAMES)}
PLANS = {0.25: LOW, 0.5: {n: r + 6 for n, r in LOW.items()}, 1.0: {n: r + 12 for n, r in LOW.items()}}


def _model():
    model = get_peft_model(tiny_llama(), NSNConfig(target_modules=TARGETS, budget_plans=PLANS, rank_granularity=8))
    return model.eval()


# Every way of saying a rank: what set_rank/at_rank receive (positional or keyword arguments).
WAYS = {
    "int": ((8,), {}),
    "fraction keyword": ((), {"fraction": 0.5}),
    "fraction spec": ((RankSpec.fraction(0.5),), {}),
    "flops keyword": ((), {"flops": 0.25}),
    "flops spec": ((RankSpec.flops(0.5),), {}),
    "mapping": (({"up_proj": 3, "model.layers.1.self_attn.o_proj": 5},), {}),
    "layers spec": ((RankSpec.layers({"down_proj": 2}),), {}),
    "rank spec": ((RankSpec.rank(12),), {}),
    "full": (("full",), {}),
    "full spec": ((RankSpec.full(),), {}),
}


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("way", list(WAYS))
def test_set_rank_on_a_merged_model_computes_the_new_ranks(way, input_ids):
    args, kwargs = WAYS[way]
    reference = _model()
    reference.set_rank(flops=1.0)
    reference.set_rank(*args, **kwargs)
    expected_ranks, expected = reference.get_rank(), _logits(reference, input_ids)

    model = _model()
    model.set_rank(flops=1.0)
    model.merge_adapter()
    model.set_rank(*args, **kwargs)
    assert model.get_rank() == expected_ranks
    assert expected_ranks != PLANS[1.0] or way.startswith("full")
    torch.testing.assert_close(_logits(model, input_ids), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("way", list(WAYS))
def test_at_rank_on_a_merged_model_and_its_exit(way, input_ids):
    args, kwargs = WAYS[way]
    reference = _model()
    reference.set_rank(flops=0.5)
    before = _logits(reference, input_ids)
    with reference.at_rank(*args, **kwargs):
        inside = _logits(reference, input_ids)

    model = _model()
    model.set_rank(flops=0.5)
    model.merge_adapter()
    with nsn_peft.at_rank(model, *args, **kwargs):
        torch.testing.assert_close(_logits(model, input_ids), inside, atol=1e-5, rtol=1e-4)
    assert model.get_rank() == PLANS[0.5]
    torch.testing.assert_close(_logits(model, input_ids), before, atol=1e-5, rtol=1e-4)


def test_set_flops_on_a_merged_model_is_not_the_previous_budget(input_ids):
    """The reported bug: budget plans + merge_adapter + set_rank(flops=...) kept computing the old budget."""
    model = _model()
    model.set_rank(flops=1.0)
    at_full_budget = _logits(model, input_ids)
    model.merge_adapter()
    model.set_rank(flops=0.25)
    assert not torch.allclose(_logits(model, input_ids), at_full_budget, atol=1e-4)
    model.unmerge_adapter()
    merged_then_unmerged = _logits(model, input_ids)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, input_ids), merged_then_unmerged, atol=1e-5, rtol=1e-4)


def test_factors_only_merged_model_follows_rank_changes(input_ids):
    model = get_peft_model(
        tiny_llama(), NSNConfig(keep_base_weights=False, budget_plans=None, rank_granularity=8)
    ).eval()
    model.set_rank(16)
    expected = _logits(model, input_ids)
    model.set_rank(8)
    model.merge_adapter()
    model.set_rank(RankSpec.rank(16))
    torch.testing.assert_close(_logits(model, input_ids), expected, atol=1e-5, rtol=1e-4)


def test_a_failed_switch_changes_no_layer(input_ids):
    model = _model()
    model.set_rank(flops=0.5)
    model.merge_adapter()
    before = _logits(model, input_ids)
    with pytest.raises(ValueError, match="outside"):
        model.set_rank({"up_proj": 2, "down_proj": 10**6})
    with pytest.raises(ValueError, match="No budget plan for flops=0.3"):
        model.set_rank(RankSpec.flops(0.3))
    assert model.get_rank() == PLANS[0.5]
    torch.testing.assert_close(_logits(model, input_ids), before)


def _two_adapters():
    model = get_peft_model(tiny_llama(), NSNConfig(max_rank=8), adapter_name="a1")
    model.add_adapter("a2", NSNConfig(max_rank=16))
    model.set_adapter("a2")
    model.set_rank(4)
    a2 = _logits(model, input_ids=torch.arange(12).reshape(1, 12))
    model.set_adapter("a1")
    return model.eval(), a2


def test_merging_a_second_adapter_over_a_merged_one_raises_and_changes_nothing():
    ids = torch.arange(12).reshape(1, 12)
    model, _ = _two_adapters()
    model.merge_adapter()  # a1
    merged_a1 = _logits(model, ids)
    with pytest.raises(
        ValueError, match="Cannot merge adapter 'a2' into .* holds adapter 'a1' merged already.*unmerge_adapter"
    ):
        model.merge_and_unload(adapter_names=["a2"])
    with pytest.raises(ValueError, match="holds adapter 'a1' merged already"):
        model.merge_adapter(adapter_names=["a2"])
    assert all(m.merged_adapters == ["a1"] for m in model.modules() if isinstance(m, nsn_peft.NSNLinear))
    torch.testing.assert_close(_logits(model, ids), merged_a1)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter(adapter_names=["a1"])  # the one already merged: PEFT's warning, nothing to do


def test_after_unmerging_the_second_adapter_merges_and_unloads_to_its_weights():
    ids = torch.arange(12).reshape(1, 12)
    model, a2 = _two_adapters()
    model.merge_adapter()
    model.unmerge_adapter()
    dense = model.merge_and_unload(adapter_names=["a2"])
    assert not any(isinstance(m, nsn_peft.NSNLinear) for m in dense.modules())
    torch.testing.assert_close(_logits(dense, ids), a2, atol=1e-5, rtol=1e-4)
