import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_llama

import nsn_peft
from nsn_peft import NSNConfig, collect_activation_stats
from nsn_peft.linalg.spectra import whitened_spectrum
from nsn_peft.planning.allocate import allocate_ranks_for_budget
from nsn_peft.planning.plan import RankPlan
from nsn_peft.planning.search import search_ranks


@pytest.fixture(scope="module")
def calibrated():
    base = tiny_llama()
    ids = torch.randint(0, 101, (8, 16), generator=torch.Generator().manual_seed(0))
    return base, ids, collect_activation_stats(base, ids, show_progress=False)


def _output_error(model, stats, reference):
    """A monotone fake metric: total whitened output error of all weights against the originals."""
    total = 0.0
    for name, module in model.named_modules():
        if name in reference:
            delta = (module.weight - reference[name]).double()
            total += torch.trace(delta @ stats.gram(name).double() @ delta.T).item()
    return 1.0 + total


def test_epsilon_search_respects_the_budget_and_is_monotone(calibrated):
    base, _, stats = calibrated
    reference = {
        n: m.weight.detach().clone()
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    }
    before = {n: t.clone() for n, t in reference.items()}
    energies = {}
    for epsilon in (0.01, 0.5):
        plan = search_ranks(base, stats, lambda m: _output_error(m, stats, reference), epsilon, max_steps=6)
        assert plan.target["metric"] <= plan.target["baseline"] * (1 + epsilon) + 1e-12
        assert all(h["metric"] <= h.get("metric") for h in plan.history)
        energies[epsilon] = plan.target["group_energies"]
    assert all(energies[0.5][g] <= energies[0.01][g] for g in energies[0.01])  # more slack, less energy
    for name, module in base.named_modules():  # weights restored after the search
        if name in before:
            assert torch.equal(module.weight, before[name])


def test_epsilon_plan_feeds_config_and_round_trips(calibrated, tmp_path):
    base, ids, stats = calibrated
    reference = {
        n: m.weight.detach().clone()
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    }
    plan = search_ranks(base, stats, lambda m: _output_error(m, stats, reference), 10.0, max_steps=4, min_energy=0.3)
    plan.save(tmp_path / "plan.json")
    again = RankPlan.load(tmp_path / "plan.json")
    assert again == plan
    if plan.ranks:
        model = get_peft_model(tiny_llama(), NSNConfig(stats=stats, **plan.to_config_kwargs()))
        assert nsn_peft.get_max_rank(model) == plan.ranks


def test_plan_validation_names_the_problem(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": "nsn-peft-rank-plan", "version": 1, "ranks": {"a.b": 0}}))
    with pytest.raises(ValueError, match=r"ranks\['a\.b'\]"):
        RankPlan.load(path)
    path.write_text(json.dumps({"format": "nsn-peft-rank-plan", "version": 1, "ranks": {}, "bogus": 1}))
    with pytest.raises(ValueError, match="unknown rank-plan fields"):
        RankPlan.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RankPlan.load(path)
    with pytest.raises(FileNotFoundError):
        RankPlan.load(tmp_path / "missing.json")


@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_budget_allocation_meets_budget_and_beats_uniform(calibrated, fraction):
    base, _, stats = calibrated
    targets = ["gate_proj", "up_proj", "down_proj"]
    plan = allocate_ranks_for_budget(base, stats, fraction, target_modules=targets, normalize="energy")
    shapes = {n: (m.weight.shape[0], m.weight.shape[1]) for n, m in base.named_modules() if n.split(".")[-1] in targets}
    assert plan.parameter_fraction(shapes) <= fraction + 1e-9
    assert len(set(plan.ranks.values())) > 1  # mixed, not uniform

    def normalised_error(ranks):
        total = 0.0
        for name, module in base.named_modules():
            if name in shapes:
                spectrum = whitened_spectrum(module.weight.detach(), stats.gram(name))
                r = ranks.get(name)
                total += 0.0 if r is None else (spectrum[r:].sum() / spectrum.sum()).item()
        return total

    uniform_rank = int(fraction * 32 * 48 / (32 + 48))
    uniform = dict.fromkeys(shapes, uniform_rank)
    assert normalised_error(plan.ranks) <= normalised_error(uniform) + 1e-12


def test_budget_plan_whitened_model_save_load(calibrated, tmp_path):
    base, ids, stats = calibrated
    plan = allocate_ranks_for_budget(base, stats, 0.5, target_modules=["up_proj", "down_proj"], granularity=4)
    assert all(r % 4 == 0 for r in plan.ranks.values())
    model = get_peft_model(tiny_llama(), NSNConfig(stats=stats, **plan.to_config_kwargs()))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert nsn_peft.get_max_rank(loaded) == plan.ranks
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_budget_allocation_with_measured_sensitivity(calibrated):
    base, ids, stats = calibrated
    calls = []

    def loss_fn(model):
        calls.append(1)
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    plan = allocate_ranks_for_budget(base, stats, 0.5, target_modules=["up_proj", "down_proj"], loss_fn=loss_fn)
    assert len(calls) == 1 + 4  # reference + one per layer
    assert plan.target["measured_sensitivity"] and plan.target["achieved"] <= 0.5
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())  # weights restored


def test_whitened_epsilon_search_with_a_fake_monotone_metric(calibrated):
    base, _, stats = calibrated
    reference = {
        n: m.weight.detach().clone()
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    }
    calls = []

    def metric(model):  # higher is better: 1 / (1 + output error)
        calls.append(1)
        return 1.0 / _output_error(model, stats, reference)

    plan = search_ranks(
        base, stats, metric, 0.3, init="whitened", higher_is_better=True, max_steps=5, show_progress=False
    )
    assert plan.init == "whitened" and not plan.energies
    assert plan.target["metric"] >= plan.target["baseline"] * (1 - 0.3) - 1e-12
    assert len(calls) == 1 + 2 * 5 + 1  # baseline, 5 steps for each of 2 groups, final check
    # Progressive split: after the first of two groups at most half of ε is spent.
    first = [h for h in plan.history if h.get("group") == "attention" and h["accepted"]]
    assert all(h["metric"] >= plan.target["baseline"] * (1 - 0.15) - 1e-12 for h in first)
    # The plan reproduces the searched configuration: its metric is what the model computes with it.
    if plan.ranks:
        model = get_peft_model(tiny_llama(), NSNConfig(**plan.to_config_kwargs(stats=stats)))
        merged = model.merge_and_unload()
        assert metric(merged) == pytest.approx(plan.target["metric"], rel=1e-4)


def test_epsilon_zero_keeps_everything_dense(calibrated):
    base, _, stats = calibrated
    reference = {
        n: m.weight.detach().clone()
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    }
    plan = search_ranks(
        base, stats, lambda m: _output_error(m, stats, reference), 0.0, max_steps=3, show_progress=False
    )
    assert plan.ranks == {} and len(plan.kept_dense) == 14
    with pytest.raises(ValueError, match="nothing to adapt"):
        plan.to_config_kwargs()


def test_search_rejects_bad_arguments(calibrated):
    base, _, stats = calibrated
    with pytest.raises(ValueError, match="epsilon"):
        search_ranks(base, stats, lambda m: 1.0, -0.1)
    with pytest.raises(ValueError, match="init"):
        search_ranks(base, stats, lambda m: 1.0, 0.1, init="svd")
    adapted = get_peft_model(tiny_llama(), NSNConfig(target_modules=["up_proj"]))
    with pytest.raises(TypeError, match="dense model"):
        allocate_ranks_for_budget(adapted, stats, 0.5, target_modules=["up_proj"])


def test_uniform_and_projected_budget_plans(calibrated):
    base, ids, stats = calibrated
    from nsn_peft.planning.allocate import projected_plan_for_budget, uniform_plan

    targets = ["gate_proj", "up_proj", "down_proj"]
    uniform = uniform_plan(base, 0.5, target_modules=targets)
    assert set(uniform.ranks.values()) == {int(0.5 * 32 * 48 / 80)}
    assert uniform.parameter_fraction() <= 0.5
    projected = projected_plan_for_budget(base, stats, 0.5, target_modules=targets, show_progress=False)
    assert projected.init == "projected" and projected.parameter_fraction() <= 0.5 + 1e-9
    assert projected.target["achieved"] > 0.3  # the bisection uses most of the budget
    model = get_peft_model(tiny_llama(), NSNConfig(**projected.to_config_kwargs(stats=stats)))
    assert nsn_peft.get_max_rank(model) == projected.ranks


def test_plan_kwargs_overrides_and_shape_validation(tmp_path):
    plan = RankPlan({"a.b": 2}, ["a.c"], "whitened", shapes={"a.b": [8, 6], "a.c": [8, 6]})
    kwargs = plan.to_config_kwargs(stats="S", init="svd")
    assert kwargs["init"] == "svd" and kwargs["stats"] == "S" and kwargs["exclude_modules"] == ["a.c"]
    assert kwargs["target_modules"] == ["a.b"]
    assert plan.parameter_fraction() == pytest.approx((2 * 14 + 48) / 96)
    with pytest.raises(ValueError, match=r"ranks\['a\.b'\] = 7 exceeds"):
        RankPlan({"a.b": 7}, shapes={"a.b": [8, 6]})
    with pytest.raises(ValueError, match="both factored and dense"):
        RankPlan({"a.b": 2}, ["a.b"])
    path = tmp_path / "plan.json"
    path.write_text(
        json.dumps(
            {
                "format": "nsn-peft-rank-plan",
                "version": 1,
                "ranks": {"x": 2},
                "init": "projected",
                "energies": {"x": [0.5, 1.5]},
            }
        )
    )
    with pytest.raises(ValueError, match=r"plan\.json: RankPlan\.energies\['x'\]"):
        RankPlan.load(path)
    path.write_text(json.dumps({"format": "nsn-peft-rank-plan", "version": 2, "ranks": {}}))
    with pytest.raises(ValueError, match="version 2"):
        RankPlan.load(path)


def test_loss_weighted_components_are_additive_and_exact(calibrated):
    from nsn_peft import collect_gradient_stats
    from nsn_peft.linalg.spectra import loss_weighted_spectrum

    base, ids, stats = calibrated
    grads = collect_gradient_stats(base, ids, show_progress=False)
    name = "model.layers.1.mlp.down_proj"
    weight = dict(base.named_modules())[name].weight.detach().double()
    c, g = stats.gram(name).double(), grads.gram(name).double()
    errors = loss_weighted_spectrum(weight, c, g, damp=0.0)
    b, a = nsn_peft.linalg.decompose.whitened_factors(weight, c, None, damp=0.0)
    for r in (1, 5, 20):
        delta = b[:, r:] @ a[r:]  # dropping the components after the rank-r prefix
        exact = torch.trace(g @ delta @ c @ delta.T).item()
        assert errors[r:].sum().item() == pytest.approx(exact, rel=1e-6, abs=1e-12 * errors.sum().item())


@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_gradient_weighted_allocation_meets_budget_and_beats_uniform(calibrated, fraction):
    from nsn_peft import collect_gradient_stats
    from nsn_peft.planning.allocate import uniform_plan, whitened_spectra

    base, ids, stats = calibrated
    targets = ["gate_proj", "up_proj", "down_proj"]
    grads = collect_gradient_stats(base, ids, target_modules=targets, show_progress=False)
    plan = allocate_ranks_for_budget(
        base, stats, fraction, target_modules=targets, gradient_stats=grads, show_progress=False
    )
    assert plan.target["weighting"] == "output_gradient" and plan.target["normalize"] == "none"
    assert plan.parameter_fraction() <= fraction + 1e-9
    errors = whitened_spectra(base, stats, target_modules=targets, gradient_stats=grads, show_progress=False)

    def loss_increase(p):
        return sum(errors[n][p.ranks[n] :].sum().item() for n in p.ranks)

    assert loss_increase(plan) <= loss_increase(uniform_plan(base, fraction, target_modules=targets)) + 1e-12
    with pytest.raises(
        ValueError,
        match=r"Output-gradient statistics from gradient_stats \(model .llama.\) do not match this model: missing layers",
    ):
        allocate_ranks_for_budget(base, stats, fraction, target_modules=["q_proj"], gradient_stats=grads)
    with pytest.raises(ValueError, match="gradient_stats holds activation statistics, not output_gradient statistics"):
        allocate_ranks_for_budget(base, stats, fraction, target_modules=targets, gradient_stats=stats)


@pytest.mark.parametrize("init", ["projected", "whitened"])
def test_decomposition_cache_changes_only_the_time(calibrated, init):
    """A step reuses each layer's energy-independent decomposition; the search it makes is the one without."""
    base, _, stats = calibrated
    reference = {
        n: m.weight.detach().clone()
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    }

    def search(cache_bytes):
        return search_ranks(
            base,
            stats,
            lambda m: _output_error(m, stats, reference),
            0.2,
            init=init,
            max_steps=4,
            min_energy=0.3,
            show_progress=False,
            cache_bytes=cache_bytes,
        )

    cached, uncached, partial = search(2**30), search(0), search(40_000)  # partial: only the first layers fit
    for plan in (uncached, partial):
        assert plan.ranks == cached.ranks and plan.kept_dense == cached.kept_dense
        assert [h["metric"] for h in plan.history] == pytest.approx([h["metric"] for h in cached.history], rel=1e-9)
    with pytest.raises(ValueError, match="cache_bytes"):
        search(-1)
