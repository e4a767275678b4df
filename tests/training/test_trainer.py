"""Multi-rank training: loss math, NSNTrainer integration, checkpoints, evaluation at several ranks."""

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import tiny_llama
from transformers import TrainingArguments

import nsn_peft
from nsn_peft import NSNConfig
from nsn_peft.training import (
    MULTIRANK_STATE_JSON,
    MULTIRANK_STATE_TENSORS,
    FixedRankSampler,
    NSNTrainer,
    SandwichRankSampler,
    UncertaintyWeightedLoss,
    UniformRankSampler,
    distillation_loss,
)

TARGETS = ["up_proj", "gate_proj", "down_proj"]
GRID = [8, 16, 24, 32]  # tiny_llama MLP (32 x 48) with granularity 8


# -- loss math ---------------------------------------------------------------------------------------
def test_uncertainty_gradients_match_analytic_formula():
    loss_fn = UncertaintyWeightedLoss(3)
    with torch.no_grad():
        loss_fn.log_vars.copy_(torch.tensor([-0.5, 0.3, 1.2]))
    losses = torch.tensor([2.0, 3.5, 0.7], requires_grad=True)
    total = loss_fn({0: losses[0], 1: losses[1], 2: losses[2]})
    total.backward()
    s = loss_fn.log_vars.detach()
    expected = (torch.exp(-s) * losses.detach() + s).sum()
    torch.testing.assert_close(total.detach(), expected)
    # d/ds (e^-s L + s) = 1 - e^-s L ;  d/dL = e^-s
    torch.testing.assert_close(loss_fn.log_vars.grad, 1 - torch.exp(-s) * losses.detach())
    torch.testing.assert_close(losses.grad, torch.exp(-s))


def test_uncertainty_equilibrium_is_log_loss_and_shared_buckets():
    loss_fn = UncertaintyWeightedLoss(1)
    with torch.no_grad():
        loss_fn.log_vars.fill_(math.log(2.5))
    loss_fn([(0, torch.tensor(2.5))]).backward()
    assert abs(loss_fn.log_vars.grad.item()) < 1e-6  # stationary at s = log L: weight 1/L
    # two ranks in one bucket: each adds its own term
    loss_fn.log_vars.grad = None
    loss_fn([(0, torch.tensor(1.0)), (0, torch.tensor(3.0))]).backward()
    torch.testing.assert_close(loss_fn.log_vars.grad, torch.tensor([2 - 4.0 / 2.5]))


def test_regularizer_scale_and_sum_weighting():
    loss_fn = UncertaintyWeightedLoss(2, init_logvar=0.4)
    term = loss_fn.term(1, torch.tensor(2.0), regularizer_scale=0.25)
    torch.testing.assert_close(term, torch.exp(torch.tensor(-0.4)) * 2.0 + 0.1)
    fixed = UncertaintyWeightedLoss(2, weighting="sum", weights=[1.0, 0.5])
    assert not fixed.log_vars.requires_grad and not fixed.learnable
    losses = torch.tensor([2.0, 4.0], requires_grad=True)
    total = fixed({0: losses[0], 1: losses[1]})
    total.backward()
    torch.testing.assert_close(total.detach(), torch.tensor(4.0))
    torch.testing.assert_close(losses.grad, torch.tensor([1.0, 0.5]))


def test_loss_argument_errors():
    with pytest.raises(ValueError, match="weighting"):
        UncertaintyWeightedLoss(2, weighting="softmax")
    with pytest.raises(ValueError, match="weights has 3 entries but there are 2"):
        UncertaintyWeightedLoss(2, weighting="sum", weights=[1, 1, 1])
    with pytest.raises(ValueError, match="only applies to weighting='sum'"):
        UncertaintyWeightedLoss(2, weights=[1, 1])
    with pytest.raises(ValueError, match="bucket"):
        UncertaintyWeightedLoss(2).term(2, torch.tensor(1.0))


def test_distillation_loss():
    torch.manual_seed(0)
    student = torch.randn(2, 5, 7, requires_grad=True)
    teacher = torch.randn(2, 5, 7)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    value = distillation_loss(student, teacher, mask, temperature=2.0)
    p_t = torch.softmax(teacher[mask] / 2, -1)
    manual = (p_t * (p_t.log() - torch.log_softmax(student[mask] / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(value, manual)
    value.backward()
    assert student.grad[~mask].abs().max() == 0  # masked positions get no gradient


# -- trainer helpers ---------------------------------------------------------------------------------
class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=8, length=16, seed=0, repeat=False):
        g = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, 101, (1 if repeat else n, length), generator=g)
        self.rows = rows.repeat(n, 1) if repeat else rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def peft_model(seed=0):
    return get_peft_model(tiny_llama(seed), NSNConfig(target_modules=TARGETS, rank_granularity=8))


def make_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        weight_decay=0.0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# -- trainer -----------------------------------------------------------------------------------------
def test_trainer_loss_decreases_and_logs_per_rank(tmp_path):
    model = peft_model()
    trainer = NSNTrainer(
        model,
        make_args(tmp_path, max_steps=12, learning_rate=3e-2),
        train_dataset=TokenData(repeat=True),
        rank_sampler=SandwichRankSampler(1),
    )
    assert trainer.rank_grid == GRID
    assert any(group["params"] == [trainer.rank_loss.log_vars] for group in trainer.create_optimizer().param_groups)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for rank in (8, 32):  # sandwich: max and min every step
        series = [h[f"loss@r={rank}"] for h in logs]
        assert series[-1] < series[0] - 0.3, (rank, series)
        assert all(f"logvar@r={r}" in h for h in logs for r in GRID)
    assert logs[-1]["loss"] < logs[0]["loss"]
    # the log-variances moved towards log L (L > 1 here, so up)
    assert (trainer.rank_loss.log_vars.detach() > 0).any()
    assert trainer.rank_loss.log_vars.grad is None  # cleared after every optimizer step
    assert trainer.rank_counts[32] == 12 and trainer.rank_counts[8] == 12
    assert sum(trainer.rank_counts.values()) == 12 * 3


def test_per_rank_backward_matches_single_graph_and_gradient_accumulation(tmp_path):
    results = []
    for per_rank, batch, accumulation in ((True, 4, 1), (False, 4, 1), (True, 2, 2), (False, 2, 2)):
        model = peft_model()
        trainer = NSNTrainer(
            model,
            make_args(
                tmp_path, max_steps=2, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation
            ),
            train_dataset=TokenData(n=8),
            rank_sampler=UniformRankSampler(2, seed=1),
            backward_per_rank=per_rank,
        )
        trainer.train()
        results.append((trainable_state(model), trainer.rank_loss.log_vars.detach().clone()))
    reference_params, reference_logvars = results[0]
    for params, logvars in results[1:]:
        torch.testing.assert_close(logvars, reference_logvars, atol=1e-5, rtol=1e-4)
        for name, value in params.items():
            torch.testing.assert_close(value, reference_params[name], atol=1e-5, rtol=1e-4, msg=name)


def test_one_step_gradients_of_log_vars(tmp_path):
    """The trainer's log-variance gradient is 1 - e^{-s} L_r for the sampled ranks and 0 elsewhere."""
    model = peft_model()
    trainer = NSNTrainer(
        model,
        make_args(tmp_path, max_steps=1),
        train_dataset=TokenData(),
        rank_sampler=FixedRankSampler([8, 32]),
        init_logvar=0.3,
    )
    batch = {k: torch.stack([TokenData()[i][k] for i in range(4)]) for k in ("input_ids", "labels")}
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, batch)
    expected = torch.zeros(4)
    with torch.no_grad():
        for r in (8, 32):
            with nsn_peft.at_rank(model, r):
                loss = model(**batch).loss
            expected[GRID.index(r)] = 1 - math.exp(-0.3) * loss.item()
    torch.testing.assert_close(trainer.rank_loss.log_vars.grad, expected, atol=1e-5, rtol=1e-5)


def test_evaluate_reports_each_rank(tmp_path):
    model = peft_model()
    trainer = NSNTrainer(model, make_args(tmp_path), train_dataset=TokenData(), eval_dataset=TokenData(4, seed=3))
    assert trainer.eval_ranks == [8, 16, 24, 32]
    metrics = trainer.evaluate()
    per_rank = {r: metrics[f"eval_loss@r={r}"] for r in GRID}
    assert len(set(per_rank.values())) == 4
    assert metrics["eval_loss"] == pytest.approx(sum(per_rank.values()) / 4)
    assert "eval_runtime" in metrics and not any(k.startswith("eval_runtime@") for k in metrics)
    # the full rank reproduces the dense model
    with torch.no_grad(), model.disable_adapter():
        dense = model(
            **{k: torch.stack([TokenData(4, seed=3)[i][k] for i in range(4)]) for k in ("input_ids", "labels")}
        ).loss
    assert per_rank[32] == pytest.approx(dense.item(), rel=1e-4)
    assert nsn_peft.get_rank(model)["model.layers.0.mlp.up_proj"] == 32  # rank restored after evaluation
    named = trainer.evaluate(eval_dataset={"a": TokenData(4, seed=3), "b": TokenData(4, seed=4)}, eval_ranks=[16])
    assert set(k for k in named if "loss" in k) == {
        "eval_a_loss@r=16",
        "eval_a_loss",
        "eval_b_loss@r=16",
        "eval_b_loss",
    }
    assert trainer.state.log_history[-1]["eval_b_loss@r=16"] == named["eval_b_loss@r=16"]


def test_checkpoint_resume_restores_log_vars_and_sampler(tmp_path):
    full_model = peft_model()
    args = make_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    full = NSNTrainer(full_model, args, train_dataset=TokenData(n=24), rank_sampler=UniformRankSampler(2, seed=0))
    full.train()
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert (checkpoint / MULTIRANK_STATE_TENSORS).is_file() and (checkpoint / MULTIRANK_STATE_JSON).is_file()
    saved = load_file(str(checkpoint / MULTIRANK_STATE_TENSORS))["log_vars"]
    meta = json.loads((checkpoint / MULTIRANK_STATE_JSON).read_text())
    assert meta["sampler"]["type"] == "uniform" and meta["sampler"]["seed"] == 0
    assert sum(meta["rank_counts"].values()) == 3 * 2
    assert not torch.equal(saved, torch.zeros(4))

    # the resumed trainer starts with another sampler seed: the checkpoint's comes back
    model = peft_model()
    args = make_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    resumed = NSNTrainer(model, args, train_dataset=TokenData(n=24), rank_sampler=UniformRankSampler(2, seed=99))
    resumed._load_from_checkpoint(str(checkpoint))
    torch.testing.assert_close(resumed.rank_loss.log_vars.detach(), saved)
    assert resumed.rank_sampler.seed == 0
    assert resumed.rank_counts == {int(k): v for k, v in meta["rank_counts"].items()}

    resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(
        resumed.rank_loss.log_vars.detach(), full.rank_loss.log_vars.detach(), atol=1e-6, rtol=1e-5
    )
    assert resumed.rank_counts == full.rank_counts
    for name, value in trainable_state(model).items():
        torch.testing.assert_close(value, trainable_state(full_model)[name], atol=1e-6, rtol=1e-5, msg=name)
    late_losses = [h["loss"] for h in full.state.log_history if "loss" in h and h["step"] > 3]
    resumed_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 3]
    assert resumed_losses == pytest.approx(late_losses, rel=1e-5)

    # the final checkpoint is an ordinary PEFT adapter
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out" / "checkpoint-6"))
    assert nsn_peft.selectable_ranks(loaded) == GRID


def test_resume_rejects_mismatched_buckets(tmp_path):
    model = peft_model()
    trainer = NSNTrainer(model, make_args(tmp_path, max_steps=1), train_dataset=TokenData())
    trainer.save_multirank_state(tmp_path / "state")
    other = NSNTrainer(peft_model(), make_args(tmp_path, max_steps=1), train_dataset=TokenData(), num_rank_buckets=2)
    with pytest.raises(ValueError, match="rank buckets"):
        other.load_multirank_state(tmp_path / "state")


def test_distillation_runs_with_and_without_teacher_rank(tmp_path):
    for sampler in (SandwichRankSampler(1), FixedRankSampler([8, 16])):
        model = peft_model()
        trainer = NSNTrainer(
            model,
            make_args(tmp_path, max_steps=3),
            train_dataset=TokenData(repeat=True),
            rank_sampler=sampler,
            distill_alpha=0.5,
            distill_temperature=2.0,
        )
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert "distill@r=8" in logs[-1] and "distill@r=32" not in logs[-1]
        assert all(math.isfinite(h["distill@r=8"]) and h["distill@r=8"] >= 0 for h in logs)


def test_activation_checkpointing_and_bf16(tmp_path):
    states = []
    for checkpointing in (False, True):
        model = peft_model()
        args = make_args(tmp_path, max_steps=2, activation_checkpointing=checkpointing)
        NSNTrainer(model, args, train_dataset=TokenData(), rank_sampler=SandwichRankSampler(1)).train()
        states.append(trainable_state(model))
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, atol=1e-5, rtol=1e-4, msg=name)

    with pytest.raises(ValueError, match="activation checkpointing"):
        model = peft_model()
        args = make_args(tmp_path, max_steps=1, activation_checkpointing=True)
        NSNTrainer(model, args, train_dataset=TokenData(), backward_per_rank=False).train()

    model = peft_model()
    trainer = NSNTrainer(model, make_args(tmp_path, max_steps=2, bf16=True), train_dataset=TokenData())
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_trainer_argument_errors(tmp_path):
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match="no NSN layers"):
        NSNTrainer(tiny_llama(), args, train_dataset=TokenData())
    with pytest.raises(ValueError, match="bound to ranks"):
        NSNTrainer(peft_model(), args, train_dataset=TokenData(), rank_sampler=SandwichRankSampler(1, grid=[64, 128]))
    with pytest.raises(ValueError, match=r"\[64\].*granularity grid"):
        NSNTrainer(peft_model(), args, train_dataset=TokenData(), rank_sampler=[64])
    with pytest.raises(ValueError, match="eval_ranks"):
        NSNTrainer(peft_model(), args, train_dataset=TokenData(), eval_ranks=[64])
    with pytest.raises(ValueError, match="distill_alpha"):
        NSNTrainer(peft_model(), args, train_dataset=TokenData(), distill_alpha=1.5)
    with pytest.raises(ValueError, match="weighting"):
        NSNTrainer(peft_model(), args, train_dataset=TokenData(), weighting="max")
    assert args.ddp_find_unused_parameters is False
