"""Per-component truncation errors of a layer's nested factorisation: what dropping each rank costs."""

from __future__ import annotations

import torch

from . import decompose

__all__ = ["loss_weighted_spectrum", "uniform_rank", "whitened_spectrum"]


@torch.no_grad()
def whitened_spectrum(weight: torch.Tensor, gram: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """Squared singular values of ``W L`` (``C = LLᵀ``), descending: dropping component i of the whitened
    factorisation adds exactly ``σ_i²`` to the output error ``‖(W − W_r)Xᵀ‖²`` (per calibration token)."""
    w = weight.double()
    chol = decompose.damped_cholesky(decompose.symmetrized(gram, torch.float64, w.device), damp, overwrite=True)
    wl = w @ chol
    del chol
    small = wl @ wl.T if w.shape[0] <= w.shape[1] else wl.T @ wl
    return decompose.robust_eigh(small, values_only=True)[0].flip(0).clamp_min(0)


def uniform_rank(m: int, d: int, fraction: float) -> int:
    """The rank of an m×d layer keeping ``fraction`` of its parameters (at least 1)."""
    return max(1, min(int(fraction * m * d / (m + d)), min(m, d)))


@torch.no_grad()
def loss_weighted_spectrum(
    weight: torch.Tensor, gram: torch.Tensor, grad_gram: torch.Tensor, damp: float = 1e-6
) -> torch.Tensor:
    """Second-order loss increase of dropping each component of the whitened factorisation (in nesting order).

    With the whitened factors ``W = Σ_i b_i a_i`` (:func:`nsn_peft.decompose.whitened_factors`), input Gram
    ``C`` and output-gradient Gram ``G`` (:func:`nsn_peft.collect_gradient_stats`), both per token, the
    components are orthogonal in the ``C`` metric, so dropping a set of them raises the loss by about
    ``½ Σ_i (b_iᵀ G b_i)(a_i C a_iᵀ)``: the returned ``e_i = (b_iᵀ G b_i)(a_i C a_iᵀ)`` are additive. Unlike
    :func:`whitened_spectrum` they weigh each output direction by how much the loss reacts to it, which
    makes errors of different layers comparable.
    """
    m = weight.shape[0]
    if grad_gram.shape != (m, m):
        raise ValueError(f"Output-gradient Gram shape {tuple(grad_gram.shape)} does not match out_features {m}")
    b, a = decompose.whitened_factors(weight, gram, None, damp=damp)
    output_side = _quadratic_forms(b.T, grad_gram)
    del b
    return (output_side * _quadratic_forms(a, gram)).clamp_min(0)


def _quadratic_forms(rows: torch.Tensor, matrix: torch.Tensor, strip: int = 2048) -> torch.Tensor:
    """``v_i M v_iᵀ`` for every row ``v_i`` of ``rows``, reading ``matrix`` in column strips (moved to ``rows``'
    device and dtype one strip at a time): a 14,336-wide float64 copy of ``M`` would take 1.6 GB."""
    total = torch.zeros(rows.shape[0], dtype=rows.dtype, device=rows.device)
    for j in range(0, matrix.shape[1], strip):
        columns = matrix[:, j : j + strip].to(device=rows.device, dtype=rows.dtype)
        total += ((rows @ columns) * rows[:, j : j + strip]).sum(1)
    return total
