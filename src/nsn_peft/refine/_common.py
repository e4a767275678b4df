"""Pieces shared by the block-wise and end-to-end stages: precision, learning-rate schedule, what is trained."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterator
from typing import Optional

import torch
from torch import nn

from .blocks import nsn_factors

PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def autocast(device: torch.device, precision: str):
    """bf16 autocast on GPUs (``"auto"``/``"bf16"``), full precision otherwise."""
    check_precision(precision)
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def trainable_factors(module: nn.Module, frozen: Collection[str] = ()) -> dict[str, nn.Parameter]:
    """NSN factors inside ``module`` except those of the layers named in ``frozen`` (base-model names)."""
    return {name: p for name, p in nsn_factors(module).items() if name.rsplit(".nsn_", 1)[0] not in frozen}


@contextlib.contextmanager
def only_these_trainable(model: nn.Module, params: Collection[nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` on exactly ``params`` inside the block (every flag restored on exit)."""
    wanted = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def factor_rms(params: list[nn.Parameter]) -> float:
    """Root-mean-square of the values of ``params`` (all together)."""
    total = sum(float(p.detach().float().square().sum()) for p in params)
    count = sum(p.numel() for p in params)
    return math.sqrt(total / max(count, 1))


def make_optimizer(params: list[nn.Parameter], relative_lr: float) -> torch.optim.Optimizer:
    """AdamW whose peak learning rate is ``relative_lr × RMS(params)``.

    An Adam step moves each weight by about the learning rate whatever the loss scale, so a rate relative to
    the factors' typical size means the same on models whose weights have different scales: the defaults
    carry over to a new model without tuning.
    """
    peak = relative_lr * max(factor_rms(params), 1e-12)
    # β2 = 0.95: a few hundred steps are too few for the default 0.999 to settle on a new loss scale.
    optimizer = torch.optim.AdamW(params, lr=peak, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8)
    for group in optimizer.param_groups:
        group["peak_lr"] = peak
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor


def model_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def check_tokens(calibration: torch.Tensor, what: str = "calibration") -> torch.Tensor:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.is_floating_point():
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"{what} must be a (sequences, seq_len) tensor of token ids, got {shape}")
    if calibration.shape[1] < 2:
        raise ValueError(f"{what} sequences must hold at least 2 tokens, got {calibration.shape[1]}")
    return calibration


@torch.no_grad()
def mean_nll(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 8,
    precision: str = "auto",
    max_batches: Optional[int] = None,
) -> float:
    """Mean next-token negative log-likelihood (nats) of ``model`` over token ``blocks``."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, start in enumerate(range(0, blocks.shape[0], batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            ids = blocks[start : start + batch_size].to(device)
            with autocast(device, precision):
                logits = model(input_ids=ids).logits
            nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="sum")
            total += float(nll)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / max(count, 1)
