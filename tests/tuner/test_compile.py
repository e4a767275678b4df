"""Rank switching under torch.compile: warmed ranks never recompile and stay equal to eager."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_llama

import nsn_peft
from nsn_peft import NSNConfig, RankSpec
from nsn_peft.tuner.compile import compiled_graph_count


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=False):
        yield
    torch._dynamo.reset()


def _model(**kwargs):
    return get_peft_model(tiny_llama(), NSNConfig(keep_base_weights=False, rank_granularity=8, **kwargs)).eval()


def _check_switches(model, compiled, ranks, input_ids):
    before = compiled_graph_count()
    for rank in list(ranks) + list(reversed(ranks)):
        model.set_rank(rank)
        with torch.no_grad():
            out, ref = compiled(input_ids).logits, model.get_base_model()(input_ids).logits
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    return compiled_graph_count() - before


def test_warmed_ranks_switch_without_recompiling(input_ids):
    model = _model()
    ranks = [32, 8, 16, {"up_proj": 4, "down_proj": 24}, RankSpec.fraction(0.5), 2]
    warm = nsn_peft.compile_for_ranks(model.get_base_model(), ranks, example_inputs=(input_ids,), backend="eager")
    assert warm.new_graphs[0] == 1
    assert warm.new_graphs[1:3] == [0, 0]
    assert sum(warm.new_graphs) <= 2  # at most once more, for the first mix of different ranks across layers
    assert model.get_rank() == {n: r for n, r in nsn_peft.get_max_rank(model).items()}  # rank restored
    assert _check_switches(model, warm.module, ranks, input_ids) == 0


def test_a_rank_outside_the_warmed_ones_compiles_once_more_at_most(input_ids):
    model = _model()
    warm = nsn_peft.compile_for_ranks(model.get_base_model(), [16, 8], example_inputs=(input_ids,), backend="eager")
    assert _check_switches(model, warm.module, [24, 5], input_ids) == 0  # any rank >= 2: same graph
    assert _check_switches(model, warm.module, [1], input_ids) == 1  # dynamo specialises size 1: one more graph
    assert _check_switches(model, warm.module, [1, 16], input_ids) == 0


def test_warmup_callable_for_generate(input_ids):
    model = _model()
    compiled = torch.compile(model.get_base_model(), backend="eager")
    fractions = [RankSpec.fraction(0.25), RankSpec.fraction(0.5), RankSpec.full()]
    warm = nsn_peft.compile_for_ranks(model, fractions, warmup=lambda: compiled(input_ids))
    assert warm.new_graphs == [1, 0, 0] and warm.recompiles_after_first == 0 and warm.module is None


def test_a_bare_float_still_means_a_fraction_but_warns(input_ids):
    model = _model()
    compiled = torch.compile(model.get_base_model(), backend="eager")
    with pytest.warns(FutureWarning, match=r"RankSpec.fraction\(0.25\)"):
        warm = nsn_peft.compile_for_ranks(model, [0.25, RankSpec.fraction(0.5)], warmup=lambda: compiled(input_ids))
    assert warm.new_graphs == [1, 0]
    with nsn_peft.at_rank(model, fraction=0.25):
        at_quarter = model.get_rank()
    assert at_quarter != model.get_rank()


def test_budget_plans_warm_like_any_rank(input_ids):
    model = _model()
    names = list(model.get_rank())
    plans = {0.5: {n: 8 for n in names}, 1.0: {n: 16 for n in names}}
    model.peft_config["default"].budget_plans = nsn_peft.tuner.config.normalize_budget_plans(plans)
    compiled = torch.compile(model.get_base_model(), backend="eager")
    warm = nsn_peft.compile_for_ranks(
        model, [RankSpec.flops(1.0), RankSpec.flops(0.5)], warmup=lambda: compiled(input_ids)
    )
    assert warm.new_graphs == [1, 0]
    assert _check_switches(model, compiled, [RankSpec.flops(0.5), RankSpec.flops(1.0)], input_ids) == 0


def test_compile_for_ranks_makes_a_training_layout_rank_major(input_ids):
    model = get_peft_model(tiny_llama(), NSNConfig(rank_granularity=8)).eval()  # dense kept, row-major factors
    warm = nsn_peft.compile_for_ranks(model.get_base_model(), [32, 8, 16], example_inputs=(input_ids,), backend="eager")
    assert warm.new_graphs == [1, 0, 0]


def test_rank_stays_symbolic_with_dynamic_false(input_ids):
    model = _model()
    compiled = torch.compile(model.get_base_model(), backend="eager", dynamic=False)  # as generate's default config
    warm = nsn_peft.compile_for_ranks(model, [2, 3, 4, 5], warmup=lambda: compiled(input_ids))
    assert warm.new_graphs == [1, 0, 0, 0]


@pytest.mark.slow
def test_rank_specialising_compilation_is_noticed_and_never_silently_falls_back(input_ids, monkeypatch):
    # Simulate code that specialises on the rank: without the dynamic mark every rank is a new constant.
    monkeypatch.setattr(torch._dynamo, "maybe_mark_dynamic", lambda *args: None)
    monkeypatch.setattr(torch._dynamo.config, "automatic_dynamic_shapes", False)
    model = _model()
    compiled = torch.compile(model.get_base_model(), backend="eager")
    ranks = list(range(2, 14))  # more ranks than dynamo's default recompile limit (8)
    with pytest.warns(UserWarning, match="each rank compiles its own graph"):
        warm = nsn_peft.compile_for_ranks(model, ranks, warmup=lambda: compiled(input_ids))
    assert all(n == 1 for n in warm.new_graphs)
    assert torch._dynamo.config.recompile_limit >= len(ranks)
    assert torch._dynamo.config.fail_on_recompile_limit_hit
    assert _check_switches(model, compiled, ranks, input_ids) == 0  # every warmed rank still compiled, none eager


def test_compile_for_ranks_argument_errors(input_ids):
    model = _model()
    with pytest.raises(ValueError, match="at least one rank"):
        nsn_peft.compile_for_ranks(model, [], example_inputs=(input_ids,))
    with pytest.raises(ValueError, match="warmup=<callable> or example_inputs"):
        nsn_peft.compile_for_ranks(model, [8])
    with pytest.raises(ValueError, match="apply only without warmup"):
        nsn_peft.compile_for_ranks(model, [8], warmup=lambda: None, mode="reduce-overhead")
    with pytest.raises(ValueError, match="No budget plan"):  # every point is checked before anything compiles
        nsn_peft.compile_for_ranks(model, [8, RankSpec.flops(0.5)], warmup=lambda: None)


@pytest.mark.slow
def test_inductor_rank_switching_matches_eager(input_ids):
    model = _model()
    warm = nsn_peft.compile_for_ranks(model.get_base_model(), [32, 16, 8], example_inputs=(input_ids,))
    assert warm.new_graphs == [1, 0, 0]
    assert _check_switches(model, warm.module, [32, 16, 8, 12], input_ids) == 0
