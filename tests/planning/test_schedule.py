"""Budget schedules: nested per-layer ranks for several FLOPs budgets."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from tiny_models import tiny_llama

import nsn_peft
from nsn_peft import NSNConfig, collect_activation_stats, collect_gradient_stats, plan_budget_schedule
from nsn_peft.planning import nested_budget_ranks

TARGETS = ["up_proj", "gate_proj", "down_proj"]


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(2, 40), st.integers(2, 40)), min_size=1, max_size=5),
    budgets=st.lists(st.floats(0.2, 1.0), min_size=1, max_size=4),
    granularity=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 1000),
)
def test_nested_ranks_are_monotone_and_within_budget(shapes, budgets, granularity, seed):
    g = torch.Generator().manual_seed(seed)
    named = {f"layer{i}": s for i, s in enumerate(shapes)}
    spectra = {n: torch.rand(min(s), generator=g, dtype=torch.float64) for n, s in named.items()}
    dense = sum(m * d for m, d in named.values())
    try:
        plans = nested_budget_ranks(spectra, named, budgets, granularity=granularity)
    except ValueError as err:
        assert "not reachable" in str(err)
        return
    ordered = sorted(plans)
    for small, large in zip(ordered, ordered[1:]):
        assert all(plans[small][n] <= plans[large][n] for n in named)
    for budget, plan in plans.items():
        assert sum(plan[n] * (m + d) for n, (m, d) in named.items()) <= budget * dense + 1e-6
        assert all(1 <= plan[n] <= min(named[n]) for n in named)


def test_unreachable_budget_is_reported():
    with pytest.raises(ValueError, match="FLOPs budget 0.01 is not reachable"):
        nested_budget_ranks({"a": torch.ones(8)}, {"a": (8, 8)}, [0.01], granularity=4)


@pytest.fixture(scope="module")
def tiny():
    base = tiny_llama()
    ids = torch.randint(0, 101, (8, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_activation_stats(base, ids, target_modules=TARGETS, show_progress=False)
    grads = collect_gradient_stats(base, ids, target_modules=TARGETS, show_progress=False)
    return base, ids, stats, grads


@pytest.mark.parametrize("allocation", ["mixed", "uniform"])
def test_schedule_builds_an_adapter_that_switches_budgets(tiny, allocation, input_ids):
    base, _, stats, grads = tiny
    budgets = [0.25, 0.5, 1.0]
    schedule = plan_budget_schedule(
        base, stats, budgets, target_modules=TARGETS, gradient_stats=grads, allocation=allocation, show_progress=False
    )
    assert schedule.budgets == budgets
    for small, large in zip(budgets, budgets[1:]):
        assert all(schedule.plans[small][n] <= schedule.plans[large][n] for n in schedule.max_ranks)
    for b in budgets:
        assert schedule.achieved[b] <= b + 1e-9
    import copy

    model = get_peft_model(copy.deepcopy(base), NSNConfig(stats=stats, **schedule.to_config_kwargs()))
    assert nsn_peft.get_max_rank(model) == schedule.max_ranks
    for b in budgets:
        model.set_rank(flops=b)
        assert nsn_peft.get_rank(model) == schedule.plans[b]
        assert nsn_peft.estimate_flops(model).targeted_fraction <= b + 1e-9
    # nested: the low budget is a truncation of the same factors, so its output equals that of the full-rank
    # whitened model truncated to the same ranks
    full = get_peft_model(copy.deepcopy(base), NSNConfig(target_modules=TARGETS, init="whitened", stats=stats))
    model.set_rank(flops=0.25)
    full.set_rank(schedule.plans[0.25])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, full(input_ids).logits, atol=1e-4, rtol=1e-4)


def test_mixed_schedule_needs_statistics(tiny):
    base = tiny[0]
    with pytest.raises(ValueError, match="needs activation statistics"):
        plan_budget_schedule(base, None, [0.5], target_modules=TARGETS)
    with pytest.raises(ValueError, match="allocation must be one of"):
        plan_budget_schedule(base, None, [0.5], target_modules=TARGETS, allocation="greedy")
