"""The nested factored forward in plain PyTorch: the definition every fast path is tested against."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def check_nested_args(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int, bias: Optional[torch.Tensor]
) -> None:
    """Raise ``ValueError`` on shapes the nested product does not define (cheap: shapes only, no data)."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"a and b must be 2-D, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    max_rank, d = a.shape
    if x.shape[-1] != d:
        raise ValueError(f"x has {x.shape[-1]} features but a has {d} columns")
    if b.shape[1] != max_rank:
        raise ValueError(f"b {tuple(b.shape)} does not match a {tuple(a.shape)}: b needs {max_rank} columns")
    if not 1 <= rank <= max_rank:
        raise ValueError(f"rank must be in [1, {max_rank}], got {rank}")
    if bias is not None and tuple(bias.shape) != (b.shape[0],):
        raise ValueError(f"bias must have shape ({b.shape[0]},), got {tuple(bias.shape)}")


def nested_linear_reference(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``(x · A[:rank]ᵀ) · B[:, :rank]ᵀ + bias`` as two ``F.linear`` calls on views (switching rank copies nothing).

    ``x`` is ``(..., d)``, ``a`` the ``(R, d)`` down factor, ``b`` the ``(m, R)`` up factor; the result is
    ``(..., m)`` in ``x``'s dtype. This is the reference (and the path for autograd and large token counts).
    """
    check_nested_args(x, a, b, rank, bias)
    return F.linear(F.linear(x, a[:rank]), b[:, :rank], bias)
