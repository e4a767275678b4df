"""Gram products ``XᵀX`` of activation batches, in float32 whatever the input dtype."""

from __future__ import annotations

import torch

__all__ = ["batch_gram", "pack_symmetric", "unpack_symmetric"]


def batch_gram(x: torch.Tensor) -> torch.Tensor:
    """``xᵀx`` of a ``(tokens, d)`` matrix as a float32 GEMM, whatever the input dtype.

    Measured on an H100 (SmolLM2-135M in bf16, 65,536 tokens): upcasting 16-bit activations and running a
    float32 GEMM was both faster (calibration 1.20× a plain forward against 1.37×) and more accurate than a
    tensor-core GEMM with a float32 result (``torch.mm(..., out_dtype=torch.float32)``, which cuBLAS reduces
    at lower precision: 2.5e-5 relative difference); splitting float32 inputs into bfloat16 parts for the
    tensor cores was no faster at these widths (576–4096 features) either.
    """
    if x.dim() != 2:
        raise ValueError(f"batch_gram expects a (tokens, features) matrix, got shape {tuple(x.shape)}")
    x = x.float()
    return x.T @ x


def pack_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric ``(d, d)`` matrix, row by row, as a vector of ``d(d+1)/2`` values.

    Gram matrices are symmetric: storing one triangle halves their size without losing anything.
    """
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"pack_symmetric expects a square matrix, got shape {tuple(matrix.shape)}")
    rows, cols = torch.triu_indices(matrix.shape[0], matrix.shape[0], device=matrix.device)
    return matrix[rows, cols]


def unpack_symmetric(packed: torch.Tensor, size: int) -> torch.Tensor:
    """The ``(size, size)`` symmetric matrix whose upper triangle :func:`pack_symmetric` stored in ``packed``."""
    if packed.dim() != 1 or packed.numel() != size * (size + 1) // 2:
        raise ValueError(
            f"a packed {size}×{size} symmetric matrix has {size * (size + 1) // 2} values, got shape {tuple(packed.shape)}"
        )
    rows, cols = torch.triu_indices(size, size, device=packed.device)
    matrix = torch.empty(size, size, dtype=packed.dtype, device=packed.device)
    matrix[rows, cols] = packed
    matrix[cols, rows] = packed
    return matrix
