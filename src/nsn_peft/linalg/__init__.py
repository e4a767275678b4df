"""Pure math on tensors: nested decompositions, spectra, Gram products and FLOPs/parameter counts.

The bottom of the package: nothing here imports anything else of ``nsn_peft``.
"""

from __future__ import annotations

from .decompose import ProjectedFactors, projected_factors, svd_factors, whitened_factors
from .flops import (
    break_even_rank,
    dense_flops,
    factored_flops,
    factored_params,
    factoring_saves,
    rank_for_params_fraction,
    rank_grid,
)
from .gram import batch_gram, pack_symmetric, unpack_symmetric
from .spectra import loss_weighted_spectrum, whitened_spectrum

__all__ = [
    "ProjectedFactors",
    "batch_gram",
    "break_even_rank",
    "dense_flops",
    "factored_flops",
    "factored_params",
    "factoring_saves",
    "loss_weighted_spectrum",
    "pack_symmetric",
    "projected_factors",
    "rank_for_params_fraction",
    "rank_grid",
    "svd_factors",
    "unpack_symmetric",
    "whitened_factors",
    "whitened_spectrum",
]
