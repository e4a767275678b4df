"""Calibration-trained compression: train the factors of a compressed model against the dense model.

* :func:`compress_and_refine` — the whole recipe in one call: data-aware init at a budget, mixed vs uniform
  allocation decided on validation text, block-wise then end-to-end refinement, resumable. With
  ``budgets=[0.5, 0.6, 0.8]`` it makes one adapter for a ladder of budgets (nested plans, every budget
  trained together, ``model.set_rank(flops=b)`` to switch).
* :func:`refine_blockwise` — each transformer block's factors trained to reproduce the dense block's output,
  on the inputs the refined blocks below produce.
* :func:`refine_end_to_end` — distillation of the dense model's logits (KL) over a token budget.
* :func:`mean_nll` — mean next-token negative log-likelihood over token blocks (what refinement reports).

The teacher is always the dense model the adapter was made from (its base weights, adapters bypassed).
"""

from __future__ import annotations

from ._common import mean_nll
from .blocks import find_blocks, nsn_factors
from .blockwise import BlockwiseResult, refine_blockwise
from .budgets import budgets_at_step, check_budgets
from .distill import DistillResult, refine_end_to_end
from .ladder import ladder_nll, plan_ladder
from .pipeline import RefineConfig, RefineReport, choose_on_validation, compress_and_refine, truncate_to_active_ranks
from .state import RefineState

__all__ = [
    "BlockwiseResult",
    "DistillResult",
    "RefineConfig",
    "RefineReport",
    "RefineState",
    "budgets_at_step",
    "check_budgets",
    "choose_on_validation",
    "compress_and_refine",
    "find_blocks",
    "ladder_nll",
    "mean_nll",
    "nsn_factors",
    "plan_ladder",
    "refine_blockwise",
    "refine_end_to_end",
    "truncate_to_active_ranks",
]
