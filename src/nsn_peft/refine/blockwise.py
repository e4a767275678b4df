"""Block-wise refinement: train each transformer block's factors to reproduce the dense block's output.

Blocks are refined in order. Block ``l`` reads the hidden states the *refined* blocks below produce and is
trained to output what the dense model's block ``l`` outputs on the dense model's own hidden states (the
true trajectory), so each block also corrects the error that reaches it from below instead of passing it
on: errors do not pile up with depth. Only NSN factors change; the dense weights, kept as the base layers,
are the teacher (:func:`nsn_peft.tuner.dense.dense_model`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..tuner.dense import dense_model
from ..tuner.layer import NSNLayer
from ..tuner.rank_spec import RankLike
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
from .blocks import BlockCall, capture_block_inputs, find_blocks, iterate_batches
from .budgets import budgets_at_step, make_budget_loss

logger = logging.getLogger(__name__)

__all__ = ["BlockwiseResult", "refine_block", "refine_blockwise"]


@dataclass
class BlockwiseResult:
    """What the block-wise stage did.

    ``error_before`` / ``error_after`` are, per block, the mean squared error of the block's output against
    the dense trajectory relative to the mean square of the dense block's own update (``y - x``), before and
    after training that block (measured on the compressed inputs; ``nan`` for blocks without factors). With
    several operating points (``points=``), they are the mean over the points, and ``point_error_after``
    holds, per block, the error at each point.
    """

    blocks: int
    tokens: int
    epochs: int
    steps: int
    seconds: float
    error_before: list[float] = field(default_factory=list)
    error_after: list[float] = field(default_factory=list)
    point_error_after: list[list[float]] = field(default_factory=list)


def refine_blockwise(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    epochs: int = 1,
    lr: float = 1e-2,
    batch_size: int = 8,
    precision: str = "auto",
    seed: int = 0,
    frozen: Collection[str] = (),
    start_block: int = 0,
    on_block_done: Optional[Callable[[int, dict], None]] = None,
    show_progress: bool = True,
    points: Optional[Sequence[RankLike]] = None,
    sampling: str = "all",
    weighting: str = "sum",
) -> BlockwiseResult:
    """Train each block's NSN factors (at their active ranks) to match the dense block, bottom to top.

    Args:
        model: a model with NSN layers whose base layers still hold the dense weights.
        calibration: ``(sequences, seq_len)`` token ids; sequences beyond a multiple of ``batch_size`` are dropped.
        epochs: passes over the calibration sequences per block.
        lr: peak AdamW learning rate relative to the RMS of the block's factors (a step moves each weight by
            about ``lr × RMS``); 5% warm-up, then cosine decay to a tenth, per block.
        precision: ``"auto"`` (bf16 autocast on GPUs), ``"bf16"`` or ``"fp32"``.
        frozen: base-model names of NSN layers left as they are (e.g. layers a plan keeps dense).
        start_block: blocks below it are taken as already refined (resuming): only their outputs are recomputed.
        on_block_done: called as ``on_block_done(block_index, record)`` after each trained block (checkpoints).
        points: operating points (e.g. ``RankSpec.flops(b)`` of a ladder of budgets) trained together instead
            of the active ranks: each point has its own compressed trajectory (block ``l`` at point ``p`` reads
            what the refined blocks below produce at ``p``), and a step trains the points that ``sampling``
            draws (``"all"``, ``"cycle"``, ``"sandwich"``), their losses combined by ``weighting``
            (``"sum"`` or ``"uncertainty"``). The model's ranks are left as they were.

    Hidden states of all calibration sequences are kept on the model's device, twice (dense and
    compressed trajectories; with ``points``, one compressed trajectory per point): ``2 × tokens × hidden``
    values in the model's dtype.
    """
    calibration = check_tokens(calibration)
    if epochs < 0 or not isinstance(epochs, int):
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    n = calibration.shape[0] // batch_size * batch_size
    if n == 0:
        raise ValueError(
            f"Block-wise refinement needs at least batch_size={batch_size} calibration sequences, got {calibration.shape[0]}"
        )
    started = time.perf_counter()
    _, blocks = find_blocks(model)
    device = model_device(model)
    ids = calibration[:n]
    batches = [ids[i : i + batch_size] for i in range(0, n, batch_size)]
    hidden_size = model.get_input_embeddings().weight.shape[1]
    dtype = model.get_input_embeddings().weight.dtype
    dense_h = torch.empty(n, ids.shape[1], hidden_size, device=device, dtype=dtype)
    with dense_model(model):
        call = capture_block_inputs(model, blocks, batches, dense_h)
    students = [dense_h.clone() for _ in (points or [None])]
    generator = torch.Generator().manual_seed(seed)
    result = BlockwiseResult(blocks=len(blocks), tokens=int(ids.numel()), epochs=epochs, steps=0, seconds=0.0)
    was_training = model.training
    model.eval()  # no dropout: the block must reproduce a deterministic function
    progress = tqdm(total=len(blocks), desc="Block-wise refinement", unit="block", disable=not show_progress)
    try:
        for index, block in enumerate(blocks):
            # Blocks below start_block were refined before (resuming): they only advance the trajectories.
            common = dict(
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                precision=precision,
                generator=generator,
                frozen=frozen,
                train=index >= start_block,
            )
            if points is None:
                before, after, steps = refine_block(block, call, dense_h, students[0], **common)
            else:
                ladder = dict(sampling=sampling, weighting=weighting, seed=seed * 1009 + index)
                errors_before, errors_after, steps = refine_block_points(
                    model, block, call, dense_h, students, points, **common, **ladder
                )
                before, after = _mean(errors_before), _mean(errors_after)
                result.point_error_after.append(errors_after)
            params = trainable_factors(block, frozen)
            result.steps += steps
            result.error_before.append(before)
            result.error_after.append(after)
            if index >= start_block and params and epochs:
                logger.info("block %d: relative error %.4g -> %.4g", index, before, after)
                if on_block_done is not None:
                    on_block_done(
                        index,
                        {
                            "block": index,
                            "error_before": before,
                            "error_after": after,
                            "seconds": round(time.perf_counter() - started, 2),
                        },
                    )
            progress.update(1)
            progress.set_postfix(error=f"{after:.3g}")
    finally:
        progress.close()
        model.train(was_training)
        del dense_h, students
    result.seconds = time.perf_counter() - started
    return result


def refine_block(
    block: nn.Module,
    call: BlockCall,
    dense_h: torch.Tensor,
    student_h: torch.Tensor,
    *,
    epochs: int = 1,
    lr: float = 1e-2,
    batch_size: int = 8,
    precision: str = "auto",
    generator: Optional[torch.Generator] = None,
    frozen: Collection[str] = (),
    train: bool = True,
) -> tuple[float, float, int]:
    """One step of :func:`refine_blockwise`: train one block's factors, then move both trajectories past it.

    ``dense_h`` holds the dense trajectory's input to ``block`` and ``student_h`` the compressed one's
    (``(n, seq_len, hidden)`` on the block's device, ``n`` a multiple of ``batch_size``); both are replaced in
    place by the block's outputs (dense block on ``dense_h``, trained block on ``student_h``). ``generator``
    orders the batches (one shared generator across blocks reproduces :func:`refine_blockwise`);
    ``train=False`` only advances (a block refined before). Returns ``(error_before, error_after, steps)``.
    """
    device = dense_h.device
    update = _advance_dense(block, call, dense_h, batch_size, precision, device)
    params = trainable_factors(block, frozen)
    steps = 0
    if not train or not params or epochs == 0:
        before = after = math.nan
        if params and train:
            before = after = _error(block, call, student_h, dense_h, batch_size, precision, device, update)
    else:
        before = _error(block, call, student_h, dense_h, batch_size, precision, device, update)
        steps = _train_block(
            block,
            call,
            student_h,
            dense_h,
            list(params.values()),
            block,
            epochs,
            lr,
            batch_size,
            precision,
            device,
            generator,
            update,
        )
        after = _error(block, call, student_h, dense_h, batch_size, precision, device, update)
    _advance_student(block, call, student_h, batch_size, precision, device)
    return before, after, steps


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def refine_block_points(
    model: nn.Module,
    block: nn.Module,
    call: BlockCall,
    dense_h: torch.Tensor,
    students: Sequence[torch.Tensor],
    points: Sequence[RankLike],
    *,
    epochs: int = 1,
    lr: float = 1e-2,
    batch_size: int = 8,
    precision: str = "auto",
    generator: Optional[torch.Generator] = None,
    frozen: Collection[str] = (),
    train: bool = True,
    sampling: str = "all",
    weighting: str = "sum",
    seed: int = 0,
) -> tuple[list[float], list[float], int]:
    """:func:`refine_block` at several operating points of ``model`` sharing one set of nested factors.

    ``students[k]`` is the compressed trajectory's input to ``block`` at ``points[k]``; every one is replaced
    by the block's output at its point. Returns ``(errors_before, errors_after, steps)`` (one error per point).
    """
    device = dense_h.device
    update = _advance_dense(block, call, dense_h, batch_size, precision, device)
    params = trainable_factors(block, frozen)

    def errors() -> list[float]:
        values = []
        for point, student_h in zip(points, students):
            with at_rank(model, point):
                values.append(_error(block, call, student_h, dense_h, batch_size, precision, device, update))
        return values

    steps = 0
    if not train or not params or epochs == 0:
        before = after = errors() if params and train else [math.nan] * len(points)
    else:
        before = errors()
        steps = _train_block_points(
            model,
            block,
            call,
            students,
            dense_h,
            list(params.values()),
            points,
            epochs,
            lr,
            batch_size,
            precision,
            device,
            generator,
            update,
            sampling,
            weighting,
            seed,
        )
        after = errors()
    for point, student_h in zip(points, students):
        with at_rank(model, point):
            _advance_student(block, call, student_h, batch_size, precision, device)
    return before, after, steps


def _train_block_points(
    model,
    block,
    call,
    students,
    dense_h,
    params,
    points,
    epochs,
    lr,
    batch_size,
    precision,
    device,
    generator,
    update: float,
    sampling: str,
    weighting: str,
    seed: int,
) -> int:
    per_epoch = dense_h.shape[0] // batch_size
    total = epochs * per_epoch
    warmup = max(1, total // 20)
    optimizer = make_optimizer(params, lr)
    combine = make_budget_loss(len(points), weighting, optimizer)
    step = 0
    with only_these_trainable(model, params):
        for _ in range(epochs):
            for idx in iterate_batches(dense_h.shape[0], batch_size, generator):
                idx = idx.to(dense_h.device)
                set_lr(optimizer, lr_factor(step, total, warmup))
                target = dense_h[idx].float()
                for k in budgets_at_step(step, len(points), sampling, seed):
                    with at_rank(model, points[k]):
                        with autocast(device, precision):
                            y = call(block, students[k][idx])
                        loss = (y.float() - target).square().mean() / max(update, 1e-30)
                        # One backward per point: one graph in memory; the gradients add up in the factors.
                        combine.term(k, loss).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
    return step


@torch.no_grad()
def _advance_dense(block, call: BlockCall, dense_h, batch_size, precision, device) -> float:
    """Replace the dense hidden states by the dense block's output; return the mean square of the update."""
    total, count = 0.0, 0
    has_factors = any(isinstance(m, NSNLayer) for m in block.modules())
    with dense_model(block, eval_mode=False) if has_factors else contextlib.nullcontext():
        for start in range(0, dense_h.shape[0], batch_size):
            x = dense_h[start : start + batch_size]
            with autocast(device, precision):
                y = call(block, x)
            total += float((y.float() - x.float()).square().sum())
            count += y.numel()
            dense_h[start : start + batch_size] = y.to(dense_h.dtype)
    return total / max(count, 1)


@torch.no_grad()
def _advance_student(block, call: BlockCall, student_h, batch_size, precision, device) -> None:
    for start in range(0, student_h.shape[0], batch_size):
        with autocast(device, precision):
            y = call(block, student_h[start : start + batch_size])
        student_h[start : start + batch_size] = y.to(student_h.dtype)


@torch.no_grad()
def _error(
    block, call: BlockCall, student_h, dense_h, batch_size, precision, device, update: float, max_batches: int = 16
) -> float:
    total, count = 0.0, 0
    for i, start in enumerate(range(0, student_h.shape[0], batch_size)):
        if i >= max_batches:
            break
        with autocast(device, precision):
            y = call(block, student_h[start : start + batch_size])
        total += float((y.float() - dense_h[start : start + batch_size].float()).square().sum())
        count += y.numel()
    return total / max(count, 1) / max(update, 1e-30)


def _train_block(
    block, call, student_h, dense_h, params, model, epochs, lr, batch_size, precision, device, generator, update: float
) -> int:
    per_epoch = student_h.shape[0] // batch_size
    total = epochs * per_epoch
    warmup = max(1, total // 20)
    optimizer = make_optimizer(params, lr)
    step = 0
    with only_these_trainable(model, params):
        for _ in range(epochs):
            for idx in iterate_batches(student_h.shape[0], batch_size, generator):
                idx = idx.to(student_h.device)
                set_lr(optimizer, lr_factor(step, total, warmup))
                with autocast(device, precision):
                    y = call(block, student_h[idx])
                # In units of the dense block's own update, so the gradient clip means the same in every block.
                loss = (y.float() - dense_h[idx].float()).square().mean() / max(update, 1e-30)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
    return step
