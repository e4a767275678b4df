import json

import pytest
import torch
from conftest import tiny_llama
from peft import PeftModel, get_peft_model

import nsn_peft
from nsn_peft import NSNConfig, collect_activation_stats
from nsn_peft.rank_search import RankPlan, allocate_ranks_for_budget, search_ranks, whitened_spectrum


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
    reference = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
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
    reference = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
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
    plan = allocate_ranks_for_budget(base, stats, fraction, target_modules=targets)
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
