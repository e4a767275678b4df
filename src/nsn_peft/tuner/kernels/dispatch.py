"""``nested_linear``: the Triton kernel where it is measured to win, the two-GEMM reference everywhere else."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .reference import check_nested_args, nested_linear_reference
from .triton_nested import TRITON_AVAILABLE

# Largest token count (product of x.shape[:-1]) sent to the kernel. On an H100, Llama-3-8B layer shapes, CUDA-graph
# clock: 1 token beat the two-GEMM reference at every shape and rank (by 2-27 %); 4 and 16 tokens were mixed (up to
# 34 % slower), 64 always slower (benchmarks/notes_kernels.md). The gain is GPU time: in eager mode the kernel's
# host-side launch cost is higher than cuBLAS's.
TRITON_MAX_TOKENS = 1

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def use_triton(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether ``nested_linear`` takes the Triton path for these operands (inference on CUDA, few tokens)."""
    if not TRITON_AVAILABLE or not x.is_cuda or x.dtype not in _KERNEL_DTYPES:
        return False
    if a.dtype != x.dtype or b.dtype != x.dtype or a.device != x.device or b.device != x.device:
        return False
    if bias is not None and (bias.device != x.device or bias.dtype != x.dtype):
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or a.requires_grad or b.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False  # the kernel has no backward
    tokens = math.prod(x.shape[:-1])
    return 1 <= tokens <= TRITON_MAX_TOKENS


def nested_linear(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``(x·A[:rank]ᵀ)·B[:, :rank]ᵀ + bias`` for ``x`` (..., d), ``a`` (R, d), ``b`` (m, R), ``bias`` (m,) or None.

    Same result as ``nested_linear_reference`` (up to rounding); the Triton kernel runs when ``use_triton`` says so,
    as the custom op ``torch.ops.nsn_peft.nested_linear`` so torch.compile keeps it in one graph.
    """
    if use_triton(x, a, b, bias):
        check_nested_args(x, a, b, rank, bias)
        return torch.ops.nsn_peft.nested_linear(x, a, b, rank, bias)
    return nested_linear_reference(x, a, b, rank, bias)
