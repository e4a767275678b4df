"""End-to-end refinement: distil the dense model's next-token distribution into the factored model.

The teacher is the untouched dense model, computed by the same module with its NSN layers bypassed
(:func:`nsn_peft.training.dense_distill.dense_teacher_logits`, shared with ``NSNTrainer(distill_teacher="dense")``),
so no second copy is held in memory. The loss is
``T²·KL(p_dense^T ‖ p_model^T)`` averaged over every position of the calibration sequences; no
language-model loss is added, so the dense model stays the fair baseline (the factored model learns to
imitate it, never to beat it on the calibration text).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..training.dense_distill import dense_teacher_logits, teacher_distillation_loss
from ..tuner.rank_spec import RankLike, RankSpec
from ..tuner.ranks import at_rank
from ._common import (
    autocast,
    check_tokens,
    lr_factor,
    make_optimizer,
    model_device,
    only_these_trainable,
    set_lr,
    trainable_factors,
)
from .budgets import budgets_at_step, make_budget_loss

logger = logging.getLogger(__name__)

__all__ = ["DistillResult", "refine_end_to_end", "step_batch"]


@dataclass
class DistillResult:
    """What the end-to-end stage did: steps, tokens seen, seconds, and the mean KL per logged interval.

    With several operating points, each ``kl_history`` record also holds ``kl@<point>`` (the mean KL of the
    steps that trained that point in the interval; absent when none did), ``log_vars`` with
    ``weighting="uncertainty"``, and ``point_steps`` counts the steps that trained each point.
    """

    steps: int
    tokens: int
    seconds: float
    kl_history: list[dict[str, float]] = field(default_factory=list)
    point_steps: dict[str, int] = field(default_factory=dict)


def step_batch(step: int, sequences: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices of optimizer step ``step``: epochs of seeded permutations, so a resumed run draws the same."""
    per_epoch = sequences // batch_size
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(sequences, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[position * batch_size : (position + 1) * batch_size]


def refine_end_to_end(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    tokens: Optional[int] = None,
    lr: float = 3e-3,
    batch_size: int = 8,
    temperature: float = 1.0,
    precision: str = "auto",
    seed: int = 0,
    frozen: Collection[str] = (),
    start_step: int = 0,
    optimizer_state: Optional[Callable[[torch.optim.Optimizer], None]] = None,
    on_interval: Optional[Callable[[int, torch.optim.Optimizer, dict], None]] = None,
    log_every: int = 20,
    show_progress: bool = True,
    points: Optional[Sequence[RankLike]] = None,
    sampling: str = "all",
    weighting: str = "sum",
    log_vars: Sequence[float] = (),
) -> DistillResult:
    """Distil the dense model into the NSN factors (at their active ranks) over a token budget.

    Args:
        model: a model with NSN layers whose base layers still hold the dense weights.
        calibration: ``(sequences, seq_len)`` token ids; batches of ``batch_size`` sequences, reshuffled each epoch.
        tokens: token budget (default: one pass over ``calibration``); steps = ``ceil(tokens / (batch_size·seq_len))``.
        lr: peak AdamW learning rate relative to the RMS of the factors (a step moves each weight by about
            ``lr × RMS``); 5% warm-up, cosine decay to a tenth.
        temperature: distillation temperature ``T``.
        precision: ``"auto"`` (bf16 autocast on GPUs), ``"bf16"`` or ``"fp32"``.
        frozen: base-model names of NSN layers left as they are.
        start_step / optimizer_state: resume at a step, with a callable that loads the saved moments.
        on_interval: ``on_interval(steps_done, optimizer, record)`` every ``log_every`` steps and at the end
            (the caller decides whether to checkpoint).
        points: operating points (e.g. ``RankSpec.flops(b)`` of a ladder of budgets) trained together instead
            of the active ranks: the dense teacher runs once per batch and each point that ``sampling`` draws
            (``"all"``, ``"cycle"``, ``"sandwich"``) is distilled from it, the losses combined by ``weighting``
            (``"sum"`` or ``"uncertainty"``; ``log_vars`` restores the log-variances of a resumed run).
            The model's ranks are left as they were.
    """
    calibration = check_tokens(calibration)
    sequences, seq_len = calibration.shape
    if sequences < batch_size:
        raise ValueError(
            f"End-to-end refinement needs at least batch_size={batch_size} calibration sequences, got {sequences}"
        )
    if not lr > 0 or not temperature > 0:
        raise ValueError(f"lr and temperature must be > 0, got lr={lr!r}, temperature={temperature!r}")
    budget = sequences * seq_len if tokens is None else int(tokens)
    total = max(1, math.ceil(budget / (batch_size * seq_len)))
    warmup = max(1, total // 20)
    device = model_device(model)
    params = list(trainable_factors(model, frozen).values())
    if not params:
        raise ValueError("The model has no NSN factors to refine")
    optimizer = make_optimizer(params, lr)
    combine = make_budget_loss(len(points), weighting, optimizer, log_vars) if points is not None else None
    if optimizer_state is not None:
        optimizer_state(optimizer)
    started = time.perf_counter()
    result = DistillResult(steps=start_step, tokens=start_step * batch_size * seq_len, seconds=0.0)
    labels = [RankSpec.coerce(p).label for p in points] if points is not None else []
    point_window: dict[int, list[torch.Tensor]] = {k: [] for k in range(len(labels))}
    result.point_steps = dict.fromkeys(labels, 0)
    for step in range(start_step if points is not None else 0):
        for k in budgets_at_step(step, len(labels), sampling, seed):
            result.point_steps[labels[k]] += 1
    was_training = model.training
    model.eval()  # no dropout in student or teacher: the target is the dense model's deterministic output
    window: list[torch.Tensor] = []
    progress = tqdm(
        total=total, initial=start_step, desc="End-to-end distillation", unit="step", disable=not show_progress
    )
    try:
        with only_these_trainable(model, params):
            for step in range(start_step, total):
                ids = calibration[step_batch(step, sequences, batch_size, seed)].to(device)
                # Teacher and per-point loss are NSNTrainer(distill_teacher="dense")'s own (training.dense_distill).
                teacher = dense_teacher_logits(model, {"input_ids": ids}, context=autocast(device, precision))
                set_lr(optimizer, lr_factor(step, total, warmup))
                if points is None:
                    with autocast(device, precision):
                        student = model(input_ids=ids).logits
                    loss = teacher_distillation_loss(student, teacher, temperature=temperature)
                    loss.backward()
                    del student
                else:
                    losses = []
                    for k in budgets_at_step(step, len(points), sampling, seed):
                        with at_rank(model, points[k]):
                            with autocast(device, precision):
                                student = model(input_ids=ids).logits
                            point_loss = teacher_distillation_loss(student, teacher, temperature=temperature)
                            # One backward per point: one graph in memory; the gradients add up in the factors.
                            combine.term(k, point_loss).backward()
                            del student
                        point_window[k].append(point_loss.detach())
                        result.point_steps[labels[k]] += 1
                        losses.append(point_loss.detach())
                    loss = torch.stack(losses).mean()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                del teacher
                window.append(loss.detach())
                result.steps = step + 1
                result.tokens = result.steps * batch_size * seq_len
                progress.update(1)
                if result.steps % log_every == 0 or result.steps == total:
                    record = {
                        "step": result.steps,
                        "kl": float(torch.stack(window).mean()),
                        "seconds": round(time.perf_counter() - started, 2),
                    }
                    window.clear()
                    for k, values in point_window.items():
                        if values:
                            record[f"kl@{labels[k]}"] = float(torch.stack(values).mean())
                            values.clear()
                    if combine is not None and combine.learnable:
                        record["log_vars"] = [float(v) for v in combine.log_vars.detach().cpu()]
                    result.kl_history.append(record)
                    progress.set_postfix(kl=f"{record['kl']:.4f}")
                    logger.info("end-to-end step %d/%d: KL %.5f", result.steps, total, record["kl"])
                    if on_interval is not None:
                        on_interval(result.steps, optimizer, record)
    finally:
        progress.close()
        model.train(was_training)
    result.seconds = time.perf_counter() - started
    return result
