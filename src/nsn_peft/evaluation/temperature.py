"""One temperature for a model's logits, fitted on calibration text: the fair baseline of a distilled student.

A student distilled from a dense teacher can beat the teacher's perplexity on held-out text by calibration
alone (its logits come out softer than an over-confident teacher's). Dividing the dense model's own logits by
one temperature fitted on the same calibration text gives that gain to the dense model too, so what remains
of a student's advantage is its own::

    t = fit_temperature(dense, calibration_ids)  # e.g. 1.2
    with with_temperature(dense, t):
        perplexity(dense, held_out_text, tokenizer=tok)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Optional

import torch
from torch import nn

__all__ = ["fit_temperature", "with_temperature"]


def _device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings.weight.device if embeddings is not None else next(model.parameters()).device


@torch.no_grad()
def fit_temperature(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    batch_size: int = 8,
    max_tokens: Optional[int] = 65536,
    low: float = 0.5,
    high: float = 2.0,
    steps: int = 61,
) -> float:
    """The temperature ``T`` that minimises the next-token NLL of ``logits / T`` on ``calibration``.

    The NLL is convex in ``1/T``, so one pass over the data scores a geometric grid of ``steps`` temperatures
    in ``[low, high]`` at once (the logits of each batch are computed once) and a parabola through the best
    grid point and its neighbours refines it.

    Args:
        model: a causal LM (its logits are read as they are: a ``PeftModel`` at its current ranks).
        calibration: ``(sequences, seq_len)`` token ids.
        max_tokens: use only the first sequences holding this many tokens (``None``: all).

    Raises ``ValueError`` for bad token ids or a grid that is not ``0 < low < high``.
    """
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.is_floating_point():
        raise ValueError(f"calibration must be a (sequences, seq_len) tensor of token ids, got {calibration!r:.80}")
    if not 0 < low < high or steps < 3:
        raise ValueError(
            f"fit_temperature needs 0 < low < high and steps >= 3, got low={low}, high={high}, steps={steps}"
        )
    if max_tokens is not None:
        calibration = calibration[: max(1, max_tokens // calibration.shape[1])]
    device = _device(model)
    # Inverse temperatures, ascending (the NLL is convex in them).
    betas = torch.logspace(math.log10(1 / high), math.log10(1 / low), steps, dtype=torch.float64)
    totals = torch.zeros(steps, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, calibration.shape[0], batch_size):
            ids = calibration[start : start + batch_size].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            logits = logits.reshape(-1, logits.shape[-1])
            targets = ids[:, 1:].reshape(-1)
            for i, beta in enumerate(betas.tolist()):
                totals[i] += float(nn.functional.cross_entropy(logits * beta, targets, reduction="sum"))
    finally:
        model.train(was_training)
    best = int(torch.argmin(totals))
    beta = float(betas[best])
    if 0 < best < steps - 1:  # vertex of the parabola through the best point and its neighbours (in log β)
        x = torch.log(betas[best - 1 : best + 2])
        y = totals[best - 1 : best + 2]
        denominator = float((x[0] - x[1]) * (x[0] - x[2]) * (x[1] - x[2]))
        a = float(x[2] * (y[1] - y[0]) + x[1] * (y[0] - y[2]) + x[0] * (y[2] - y[1])) / denominator
        b = float(x[2] ** 2 * (y[0] - y[1]) + x[1] ** 2 * (y[2] - y[0]) + x[0] ** 2 * (y[1] - y[2])) / denominator
        if a > 0:
            beta = math.exp(min(max(-b / (2 * a), float(x[0])), float(x[2])))
    return 1.0 / beta


@contextlib.contextmanager
def with_temperature(model: nn.Module, temperature: float) -> Iterator[nn.Module]:
    """Run ``model`` with its logits divided by ``temperature`` (a hook on its output embeddings)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings) to scale")
    handle = head.register_forward_hook(lambda module, args, output: output / temperature)
    try:
        yield model
    finally:
        handle.remove()
