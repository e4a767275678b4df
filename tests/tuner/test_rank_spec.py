"""``RankSpec`` and ``resolve_ranks``: one vocabulary for operating points, resolved by one pure function."""

import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from tiny_models import tiny_llama

import nsn_peft
from nsn_peft import NSNConfig, RankSpec, resolve_ranks
from nsn_peft.linalg.flops import fraction_rank
from nsn_peft.training.points import TrainingPoints
from nsn_peft.tuner.rank_points import RankPoint, resolve_rank_points
from nsn_peft.tuner.rank_spec import active_rank_field


# -- the type -------------------------------------------------------------------------------------------
def test_specs_validate_compare_and_label():
    assert RankSpec.rank(8) == RankSpec.coerce(8) == RankSpec("rank", 8)
    assert RankSpec.layers({"a": 2, "b": 3}) == RankSpec.coerce({"a": 2, "b": 3})
    assert RankSpec.coerce("full") == RankSpec.full()
    assert hash(RankSpec.flops(0.5)) == hash(RankSpec.flops(0.5))
    assert [str(s) for s in (RankSpec.rank(8), RankSpec.fraction(0.5), RankSpec.flops(0.25), RankSpec.full())] == [
        "r=8",
        "fraction=0.5",
        "flops=0.25",
        "full",
    ]
    assert repr(RankSpec.layers({"up_proj": 4})) == "RankSpec.layers({'up_proj': 4})"
    assert RankSpec.from_arguments(fraction=0.5) == RankSpec.fraction(0.5)
    for bad, match in [
        (lambda: RankSpec.rank(0), "positive int"),
        (lambda: RankSpec.rank(True), "positive int"),
        (lambda: RankSpec.fraction(1.5), r"fraction must be in \(0, 1\]"),
        (lambda: RankSpec.flops(0), r"flops must be a FLOPs fraction in \(0, 1\]"),
        (lambda: RankSpec.flops(float("nan")), "FLOPs fraction"),
        (lambda: RankSpec.layers({"a": 0}), "positive int"),
        (lambda: RankSpec("budget", 0.5), "kind must be one of"),
        (lambda: RankSpec.coerce(0.5), r"RankSpec.fraction\(0.5\).*RankSpec.flops\(0.5\)"),
        (lambda: RankSpec.from_arguments(8, flops=0.5), "exactly one"),
        (lambda: RankSpec.from_arguments(), "exactly one"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


# -- the pure resolution --------------------------------------------------------------------------------
MAXIMA = {"l0.q": 32, "l0.up": 48, "l1.q": 16, "l1.up": 5}


@settings(max_examples=60, deadline=None)
@given(
    maxima=st.dictionaries(
        st.sampled_from([f"m.layers.{i}.{t}" for i in range(4) for t in "qkvo"]), st.integers(1, 300), min_size=1
    ),
    rank=st.integers(1, 400),
    fraction=st.floats(0.01, 1.0),
    granularity=st.integers(1, 64),
)
def test_every_resolution_stays_within_each_layers_max_rank(maxima, rank, fraction, granularity):
    for spec in (RankSpec.rank(rank), RankSpec.fraction(fraction), RankSpec.full()):
        ranks = resolve_ranks(spec, maxima, granularity=granularity)
        assert set(ranks) == set(maxima)
        assert all(1 <= ranks[n] <= maxima[n] for n in maxima)
    assert resolve_ranks(RankSpec.rank(rank), maxima) == {n: min(rank, m) for n, m in maxima.items()}
    assert resolve_ranks(RankSpec.full(), maxima) == maxima
    by_fraction = resolve_ranks(RankSpec.fraction(fraction), maxima, granularity=granularity)
    assert by_fraction == {n: fraction_rank(fraction, m, granularity) for n, m in maxima.items()}
    # nested: a larger fraction never lowers a layer's rank
    larger = resolve_ranks(RankSpec.fraction(min(1.0, fraction * 1.5)), maxima, granularity=granularity)
    assert all(larger[n] >= by_fraction[n] for n in maxima)


def test_a_mapping_sets_named_layers_and_keeps_the_others():
    current = {"l0.q": 7, "l0.up": 9, "l1.q": 3, "l1.up": 2}
    ranks = resolve_ranks({"q": 4, "l0.up": 11}, MAXIMA, current=current)
    assert ranks == {"l0.q": 4, "l0.up": 11, "l1.q": 4, "l1.up": 2}
    assert resolve_ranks({"l1.up": 5}, MAXIMA) == {**MAXIMA, "l1.up": 5}  # default: the others at max
    with pytest.raises(ValueError, match="'nope' matches no NSN layer"):
        resolve_ranks({"nope": 2}, MAXIMA)
    with pytest.raises(ValueError, match=r"Rank 6 for 'l1.up' is outside \[1, 5\]"):
        resolve_ranks({"up": 6}, MAXIMA)


def test_a_budget_resolves_to_its_stored_plan():
    plans = {"0.5": {n: 2 for n in MAXIMA}, "1": dict(MAXIMA)}
    assert resolve_ranks(RankSpec.flops(0.5), MAXIMA, budget_plans=plans) == {n: 2 for n in MAXIMA}
    assert resolve_ranks(RankSpec.flops(1.0), MAXIMA, budget_plans=plans) == MAXIMA
    with pytest.raises(
        ValueError, match="No budget plan for flops=0.25; this adapter has plans for the FLOPs budgets 0.5, 1"
    ):
        resolve_ranks(RankSpec.flops(0.25), MAXIMA, budget_plans=plans)
    with pytest.raises(ValueError, match="stores none"):
        resolve_ranks(RankSpec.flops(0.25), MAXIMA)
    with pytest.raises(ValueError, match="does not match the model's NSN layers: no rank for"):
        resolve_ranks(RankSpec.flops(0.5), {**MAXIMA, "l2.q": 8}, budget_plans=plans)
    with pytest.raises(ValueError, match=r"gives 'l1.up' rank 9, outside \[1, 5\]"):
        resolve_ranks(RankSpec.flops(0.5), MAXIMA, budget_plans={"0.5": {**MAXIMA, "l1.up": 9}})


def test_the_saved_active_rank_field():
    assert active_rank_field(MAXIMA, MAXIMA) is None
    assert active_rank_field({n: min(8, m) for n, m in MAXIMA.items()}, MAXIMA) == 8  # clamped layers: still one int
    mixed = {"l0.q": 4, "l0.up": 8, "l1.q": 4, "l1.up": 5}
    assert active_rank_field(mixed, MAXIMA) == mixed


# -- on a model ------------------------------------------------------------------------------------------
def _model(**kwargs):
    return get_peft_model(
        tiny_llama(), NSNConfig(target_modules=["up_proj", "o_proj"], rank_granularity=8, **kwargs)
    ).eval()


def test_every_entry_point_takes_a_spec(input_ids):
    model = _model()
    spec = RankSpec.fraction(0.5)
    expected = nsn_peft.ranks_at(model, spec)
    assert expected != model.get_rank()  # ranks_at does not switch
    with model.at_rank(spec):
        assert model.get_rank() == expected
        inside = model.estimate_flops()
    assert model.estimate_flops(spec).targeted == inside.targeted
    assert nsn_peft.estimate_flops(model, {"up_proj": 8}).per_layer != nsn_peft.estimate_flops(model).per_layer
    model.set_rank(spec)
    assert model.get_rank() == expected
    plan = nsn_peft.RankPlan(ranks={n: 3 for n in expected})
    model.set_rank(plan.to_rank_spec())
    assert set(model.get_rank().values()) == {3}


def test_active_rank_is_derived_when_saving(tmp_path, input_ids):
    model = _model()
    model.set_rank(8)
    config = model.peft_config["default"]
    assert config.active_rank is None  # not kept in step in memory...
    model.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["active_rank"] == 8  # ...written on save
    with model.at_rank({"model.layers.0.mlp.up_proj": 3}):
        model.save_pretrained(tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "adapter_config.json").read_text())["active_rank"]
    assert saved["model.layers.0.mlp.up_proj"] == 3 and saved["model.layers.1.mlp.up_proj"] == 8
    model.set_rank("full")
    model.save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["active_rank"] is None
    for folder, ranks in (("a", {8}), ("c", set(nsn_peft.get_max_rank(model).values()))):
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / folder)
        assert set(loaded.get_rank().values()) == ranks


def test_a_second_adapter_saves_its_own_ranks(tmp_path):
    model = _model()
    model.add_adapter("other", NSNConfig(target_modules=["up_proj", "o_proj"], rank_granularity=8))
    model.set_adapter("other")
    model.set_rank(4)
    model.set_adapter("default")
    model.set_rank(16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["active_rank"] == 16
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["active_rank"] == 4


def test_rank_points_hold_a_spec(input_ids):
    model = _model(budget_plans={0.5: {n: 4 for n in _model().get_rank()}, 1.0: {n: 8 for n in _model().get_rank()}})
    points = resolve_rank_points(
        model, ranks=[8, "full"], fractions=[0.5], target_flops=[0.5], points=[RankSpec.flops(1.0), {"up_proj": 2}]
    )
    assert [p.spec for p in points] == [
        RankSpec.rank(8),
        RankSpec.full(),
        RankSpec.fraction(0.5),
        RankSpec.flops(0.5),
        RankSpec.flops(1.0),
        RankSpec.layers({"up_proj": 2}),
    ]
    assert [p.label for p in points][-2:] == ["flops=1", "layers(1)"]
    with points[3].context(model):
        assert set(model.get_rank().values()) == {4}
    with pytest.raises(ValueError, match="No budget plan for flops=0.3"):
        resolve_rank_points(model, points=[RankSpec.flops(0.3)])
    with pytest.warns(FutureWarning, match="spec="):
        old = RankPoint("half", "fraction", 0.5, fraction=0.5)
    assert old.spec == RankSpec.fraction(0.5)
    with pytest.warns(FutureWarning, match="RankPoint.spec"):
        assert old.fraction == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RankPoint("compressed", "compressed", "compressed").spec is None


def test_trainer_points_resolve_to_specs():
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(2)] + [
        f"model.layers.{i}.self_attn.o_proj" for i in range(2)
    ]
    model = _model(budget_plans={0.25: {n: 2 for n in names}, 0.5: {n: 4 for n in names}})
    points = TrainingPoints(model, [0.5, RankSpec.flops(0.25), 0.5000000001])
    assert points.grid == [1, 2] and points.budgets == [0.25, 0.5]
    assert points.spec(1) == RankSpec.flops(0.25) and points.label(2) == "flops=0.5"
    ranks = TrainingPoints(model)
    assert (
        ranks.grid == nsn_peft.selectable_ranks(model) and ranks.spec(8) == RankSpec.rank(8) and ranks.label(8) == "r=8"
    )
    with pytest.raises(ValueError, match="No budget plan for flops=0.75"):
        TrainingPoints(model, [0.75])
    with pytest.raises(ValueError, match="FLOPs budgets"):
        TrainingPoints(model, [RankSpec.rank(8)])
    with torch.no_grad(), points.at(1):
        assert set(model.get_rank().values()) == {2}
