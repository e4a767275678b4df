"""One refined adapter for a ladder of budgets: compress_and_refine(budgets=...)."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_llama

import nsn_peft
from nsn_peft import NSNConfig, RankSpec, plan_budget_schedule
from nsn_peft.refine import RefineConfig, compress_and_refine, nsn_factors, refine_blockwise, refine_end_to_end
from nsn_peft.refine import stages as stages_module
from nsn_peft.refine.budgets import budgets_at_step
from nsn_peft.training import distillation_loss
from nsn_peft.tuner.rank_spec import budget_key
from nsn_peft.tuner.ranks import nsn_layers

BUDGETS = [0.5, 0.6, 0.8]
CONFIG = RefineConfig(
    batch_size=4,
    blockwise_epochs=1,
    blockwise_lr=1e-2,
    e2e_tokens=16 * 12 * 2,
    e2e_lr=1e-2,
    gradient_tokens=64,
    save_interval_s=0.0,
    log_every=2,
    validation_fraction=0.2,
)


def _calibration(n=20, length=12, seed=0):
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(seed))


def _kl_to_dense(model, ids):
    with torch.no_grad():
        with nsn_peft.dense_model(model):
            teacher = model(input_ids=ids).logits
        return float(distillation_loss(model(input_ids=ids).logits, teacher))


def test_ladder_plans_are_nested_and_every_budget_round_trips_through_save_and_load(tmp_path, input_ids):
    model, report = compress_and_refine(
        tiny_llama(), _calibration(), budgets=BUDGETS, config=CONFIG, show_progress=False
    )
    plans = report.budget_plans
    assert list(plans) == ["0.5", "0.6", "0.8"] and report.budgets == BUDGETS and report.fraction is None
    for lower, upper in zip(plans.values(), list(plans.values())[1:]):
        assert all(lower[n] <= upper[n] for n in lower) and lower != upper
    # factors stored up to the largest plan only; every factored layer smaller than its dense weight
    assert nsn_peft.get_max_rank(model) == report.ranks == plans["0.8"]
    for name, layer in nsn_layers(model).items():
        m, d = layer.out_features, layer.in_features
        assert report.ranks[name] * (m + d) < m * d
    assert set(report.candidates) == {"mixed", "uniform"}
    scores = {n: c["validation_nll_blockwise"] for n, c in report.candidates.items()}
    assert scores[report.allocation] <= scores["uniform"]
    assert set(report.validation_nll_per_budget) == {"init", "blockwise", "end_to_end"}
    assert all(set(v) == set(plans) for v in report.validation_nll_per_budget.values())
    assert report.end_to_end["tokens"] == CONFIG.e2e_tokens and set(report.seconds) >= {
        "blockwise",
        "end_to_end",
        "total",
    }

    expected = {}
    with torch.no_grad():
        for b in BUDGETS:
            model.set_rank(flops=b)
            expected[b] = model(input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["budget_plans"] == plans
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert nsn_peft.budget_plans(loaded) == {float(k): v for k, v in plans.items()}
    with torch.no_grad():
        for b in BUDGETS:
            loaded.set_rank(flops=b)
            assert nsn_peft.get_rank(loaded) == plans[budget_key(b)]
            torch.testing.assert_close(loaded(input_ids).logits, expected[b], rtol=0, atol=0)


def _ladder_model():
    base = tiny_llama()
    schedule = plan_budget_schedule(base, None, BUDGETS, allocation="uniform", show_progress=False)
    return get_peft_model(base, NSNConfig(**schedule.to_config_kwargs(init="svd")))


@pytest.mark.parametrize("stage", ["blockwise", "end_to_end"])
def test_one_step_lowers_the_loss_of_every_budget(stage):
    model = _ladder_model()
    ids = _calibration(n=4)
    points = [RankSpec.flops(b) for b in BUDGETS]
    before = {}
    for point in points:
        with nsn_peft.at_rank(model, point):
            before[point] = _kl_to_dense(model, ids)
    ranks = nsn_peft.get_rank(model)
    if stage == "blockwise":
        result = refine_blockwise(model, ids, epochs=1, lr=1e-2, batch_size=4, points=points, show_progress=False)
        assert result.steps == 2 and len(result.point_error_after) == 2
    else:
        result = refine_end_to_end(model, ids, lr=1e-2, batch_size=4, points=points, show_progress=False)
        assert result.steps == 1 and result.point_steps == dict.fromkeys(["flops=0.5", "flops=0.6", "flops=0.8"], 1)
    assert nsn_peft.get_rank(model) == ranks  # the model's ranks are left as they were
    for point in points:
        with nsn_peft.at_rank(model, point):
            assert _kl_to_dense(model, ids) < before[point], point


def test_budget_sampling_gives_every_budget_its_turn():
    assert [budgets_at_step(s, 3, "cycle") for s in range(4)] == [[0], [1], [2], [0]]
    assert budgets_at_step(5, 3, "all") == [0, 1, 2]
    draws = [budgets_at_step(s, 4, "sandwich", seed=1) for s in range(40)]
    assert all(d[0] == 0 and d[-1] == 3 and len(d) == 3 for d in draws)
    assert {d[1] for d in draws} == {1, 2}
    assert draws == [budgets_at_step(s, 4, "sandwich", seed=1) for s in range(40)]  # a pure function of (seed, step)


def test_interrupted_ladder_resumes_to_the_same_result(tmp_path, monkeypatch):
    config = RefineConfig(
        **{
            **CONFIG.__dict__,
            "budget_sampling": "sandwich",
            "budget_weighting": "uncertainty",
            "blockwise_epochs": 0,
            "e2e_tokens": 16 * 12 * 3,
        }
    )
    calib = _calibration()
    reference, ref_report = compress_and_refine(
        tiny_llama(), calib, budgets=BUDGETS, allocation="uniform", config=config, show_progress=False
    )
    expected = {k: v.detach().clone() for k, v in nsn_factors(reference).items()}
    assert "log_vars" in ref_report.end_to_end["kl_history"][-1]

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
        compress_and_refine(
            tiny_llama(),
            calib,
            budgets=BUDGETS,
            allocation="uniform",
            config=config,
            state_dir=state_dir,
            show_progress=False,
        )
    assert json.loads((state_dir / "refine_state.json").read_text())["step"] == 4
    monkeypatch.setattr(stages_module, "refine_end_to_end", original)
    resumed, report = compress_and_refine(
        tiny_llama(),
        calib,
        budgets=BUDGETS,
        allocation="uniform",
        config=config,
        state_dir=state_dir,
        show_progress=False,
    )
    assert report.resumed and report.budget_plans == ref_report.budget_plans
    assert report.end_to_end["point_steps"] == ref_report.end_to_end["point_steps"]
    for name, value in nsn_factors(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
    for b in BUDGETS:
        resumed.set_rank(flops=b)  # the plans come back with the state
    # another ladder does not silently reuse the state
    with pytest.raises(ValueError, match="other inputs"):
        compress_and_refine(
            tiny_llama(),
            calib,
            budgets=[0.5, 0.8],
            allocation="uniform",
            config=config,
            state_dir=state_dir,
            show_progress=False,
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budgets": [0.5, 0.5]}, "twice"),
        ({"budgets": [0.8, 0.5]}, "not sorted"),
        ({"budgets": [0.0, 0.5]}, r"in \(0, 1\]"),
        ({"budgets": [0.5, 1.2]}, r"in \(0, 1\]"),
        ({"budgets": []}, "non-empty"),
        ({"budgets": [0.5], "fraction": 0.5}, "either fraction= .* or budgets="),
        ({}, "either fraction= .* or budgets="),
    ],
)
def test_bad_budgets_give_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compress_and_refine(tiny_llama(), _calibration(), config=CONFIG, show_progress=False, **kwargs)
    with pytest.raises(ValueError, match="budget_sampling"):
        RefineConfig(budget_sampling="random")


def test_single_budget_results_are_unchanged_on_a_fixed_seed():
    """The one-budget recipe gives what it gave before ladders existed (values recorded from that version)."""
    config = RefineConfig(
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
    model, report = compress_and_refine(tiny_llama(), _calibration(), 0.5, config=config, show_progress=False)
    assert report.allocation == "uniform" and report.budgets is None and report.budget_plans == {}
    recorded = {
        "dense": 4.616737018931996,
        "blockwise": 4.6139443137428975,
        "init": 4.613000002774325,
        "end_to_end": 4.614657662131569,
    }
    for stage, value in recorded.items():
        assert report.validation_nll[stage] == pytest.approx(value, rel=1e-6), stage
    total = sum(float(v.detach().double().abs().sum()) for v in nsn_factors(model).values())
    assert total == pytest.approx(418.4945781176275, rel=1e-5)


def test_a_refined_ladder_keeps_training_with_nsn_trainer(tmp_path):
    """The recipe's ladder and NSNTrainer(budgets=..., distill_teacher="dense") share the operating points (the stored
    plans), the teacher (the dense base weights) and the loss (α = 1: T²·KL only), so the trainer continues the
    end-to-end stage with what transformers.Trainer adds (gradient accumulation, several GPUs, checkpoints)."""
    from transformers import TrainingArguments

    from nsn_peft import NSNTrainer

    config = RefineConfig(**{**CONFIG.__dict__, "blockwise_epochs": 0, "e2e_tokens": 0})
    calib = _calibration()
    model, report = compress_and_refine(
        tiny_llama(), calib, budgets=BUDGETS, allocation="uniform", config=config, show_progress=False
    )
    before = {}
    for b in BUDGETS:
        with nsn_peft.at_rank(model, RankSpec.flops(b)):
            before[b] = _kl_to_dense(model, calib)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(calib)

        def __getitem__(self, i):
            return {"input_ids": calib[i], "labels": calib[i]}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        gradient_accumulation_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = NSNTrainer(
        model,
        args,
        train_dataset=Blocks(),
        budgets=report.budgets,
        distill_teacher="dense",
        distill_alpha=1.0,
        weighting="sum",
    )
    trainer.train()
    assert trainer.rank_counts == dict.fromkeys([1, 2, 3], 6)  # every budget at every optimizer step
    for b in BUDGETS:
        with nsn_peft.at_rank(model, RankSpec.flops(b)):
            assert _kl_to_dense(model, calib) < before[b], b
