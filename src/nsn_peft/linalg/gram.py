"""Gram products ``XᵀX`` of activation batches, in float32 whatever the input dtype."""

from __future__ import annotations

import torch

__all__ = ["batch_gram"]

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
