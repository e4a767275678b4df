"""Budget schedules: nested per-layer ranks for several FLOPs budgets, served by one set of factors.

A nested model runs any layer at any rank up to its max, so one adapter can serve several budgets with a
*different* rank per layer at each, provided the plans are nested: a layer's rank never decreases as the
budget grows (then every budget is a truncation of the same factors). :func:`plan_budget_schedule` makes
such plans with the loss-weighted allocation and stores them in ``NSNConfig.budget_plans``::

    schedule = plan_budget_schedule(base, stats, [0.25, 0.5, 0.75, 1.0], gradient_stats=grads)
    model = get_peft_model(base, NSNConfig(stats=stats, **schedule.to_config_kwargs()))
    model.set_rank(flops=0.5)
"""

from __future__ import annotations

import heapq
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from ..calibrate.stats import ActivationStats
from ..linalg.flops import rank_for_flops_fraction
from ..tuner.config import budget_key, normalize_budget_plans
from .allocate import whitened_spectra
from .targets import layer_shapes

logger = logging.getLogger(__name__)

__all__ = ["ALLOCATIONS", "BudgetSchedule", "nested_budget_ranks", "plan_budget_schedule"]

ALLOCATIONS = ("mixed", "uniform")


@dataclass
class BudgetSchedule:
    """Nested per-layer ranks for a list of FLOPs budgets.

    Attributes:
        plans: ``{budget: {layer: rank}}``, budgets ascending; a layer's rank never decreases with the budget.
        max_ranks: ``{layer: rank}`` each layer's largest planned rank (the factors the adapter has to store).
        shapes: ``{layer: [out_features, in_features]}``.
        allocation: ``"mixed"`` (loss-weighted) or ``"uniform"`` (every layer at the same FLOPs fraction).
        achieved: ``{budget: FLOPs fraction reached}`` (of the planned layers' dense matmul FLOPs).
        granularity: ranks are multiples of this (or a layer's max rank).
    """

    plans: dict[float, dict[str, int]]
    max_ranks: dict[str, int]
    shapes: dict[str, list[int]]
    allocation: str = "mixed"
    achieved: dict[float, float] = field(default_factory=dict)
    granularity: int = 1

    @property
    def budgets(self) -> list[float]:
        return sorted(self.plans)

    def flops_fraction(self, budget: float) -> float:
        """FLOPs of the plan at ``budget`` over the planned layers' dense FLOPs."""
        plan = self.plans[budget]
        dense = sum(m * d for m, d in self.shapes.values())
        return sum(plan[n] * (m + d) for n, (m, d) in self.shapes.items()) / dense

    def config_budget_plans(self) -> dict[str, dict[str, int]]:
        """The plans as ``NSNConfig.budget_plans`` stores them (string keys)."""
        return normalize_budget_plans({budget_key(b): dict(p) for b, p in self.plans.items()})

    def to_config_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """``NSNConfig`` keyword arguments: the planned layers, their max ranks and the budget plans.

        ``init`` defaults to ``"whitened"`` (the factors the allocation assumed); ``overrides`` win.
        """
        kwargs: dict[str, Any] = {
            "init": "whitened",
            "target_modules": sorted(self.max_ranks),
            "rank_pattern": {re.escape(n): r for n, r in self.max_ranks.items()},
            "budget_plans": self.config_budget_plans(),
        }
        kwargs.update(overrides)
        return kwargs


def nested_budget_ranks(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    budgets: Sequence[float],
    *,
    max_ranks: Optional[Mapping[str, int]] = None,
    granularity: int = 1,
) -> dict[float, dict[str, int]]:
    """Nested per-layer ranks for FLOPs budgets from per-component errors (one greedy pass, top down).

    Every layer starts at its max rank; the cut that loses the least error per FLOP saved
    (``granularity`` components of one layer at a time) is taken repeatedly, and the ranks are recorded
    each time the total falls within the next budget (largest first). Because ranks only ever decrease
    along the way, the plans are nested by construction. A rank-r layer costs ``r(m+d)`` against ``md``
    dense, so a budget may leave some layers above their break-even rank when others pay for it.

    Args:
        spectra: ``{layer: errors}``; ``errors[i]`` is the cost of dropping component ``i`` (additive).
        shapes: ``{layer: (out_features, in_features)}``.
        budgets: FLOPs fractions in (0, 1] of the layers' dense matmul FLOPs.
        max_ranks: starting rank per layer (default ``min(m, d)``).
        granularity: ranks are multiples of this or the layer's max rank; no layer goes below
            ``min(granularity, max rank)``.

    Raises:
        ValueError: a budget below what the smallest ranks cost (naming the budget and that cost).
    """
    if not budgets:
        raise ValueError("budgets must name at least one FLOPs fraction")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1:
            raise ValueError(f"Each budget must be a FLOPs fraction in (0, 1], got {b!r}")
    if not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"granularity must be a positive int, got {granularity!r}")
    missing = [n for n in shapes if n not in spectra]
    if missing:
        raise ValueError(f"spectra lacks the layers {missing[:5]}")
    top = {n: min(m, d) for n, (m, d) in shapes.items()}
    if max_ranks is not None:
        top = {n: max(1, min(int(max_ranks.get(n, top[n])), top[n])) for n in shapes}
    floor = {n: min(granularity, top[n]) for n in shapes}
    dense = sum(m * d for m, d in shapes.values())
    errors = {n: spectra[n].detach().double().cpu() for n in shapes}
    rank = dict(top)
    cost = sum(rank[n] * (m + d) for n, (m, d) in shapes.items())

    def next_cut(name: str) -> Optional[tuple[float, int]]:
        current = rank[name]
        if current <= floor[name]:
            return None
        new = max(floor[name], (current - 1) // granularity * granularity)
        m, d = shapes[name]
        lost = float(errors[name][new:current].sum())
        return lost / ((current - new) * (m + d)), new

    heap: list[tuple[float, str, int, int]] = []
    for name in shapes:
        cut = next_cut(name)
        if cut is not None:
            heapq.heappush(heap, (cut[0], name, rank[name], cut[1]))
    plans: dict[float, dict[str, int]] = {}
    for budget in sorted({float(b) for b in budgets}, reverse=True):
        limit = budget * dense
        while cost > limit + 1e-9 and heap:
            _, name, was, new = heapq.heappop(heap)
            m, d = shapes[name]
            cost -= (was - new) * (m + d)
            rank[name] = new
            cut = next_cut(name)
            if cut is not None:
                heapq.heappush(heap, (cut[0], name, new, cut[1]))
        if cost > limit + 1e-9:
            raise ValueError(
                f"FLOPs budget {budget:g} is not reachable: the smallest ranks (granularity {granularity}) already cost "
                f"{cost / dense:.4f} of the dense FLOPs"
            )
        plans[budget] = dict(rank)
    return dict(sorted(plans.items()))


def _uniform_ranks(shapes, budgets, max_ranks, granularity) -> dict[float, dict[str, int]]:
    plans = {}
    for budget in sorted({float(b) for b in budgets}):
        plans[budget] = {
            n: rank_for_flops_fraction(m, d, budget, max_ranks[n], granularity) for n, (m, d) in shapes.items()
        }
    return plans


def plan_budget_schedule(
    model: nn.Module,
    stats: Optional[ActivationStats],
    budgets: Sequence[float],
    *,
    target_modules: Union[None, str, Sequence[str]] = None,
    gradient_stats: Optional[ActivationStats] = None,
    spectra: Optional[Mapping[str, torch.Tensor]] = None,
    allocation: str = "mixed",
    max_rank: Optional[int] = None,
    granularity: int = 1,
    damp: float = 1e-6,
    device: Optional[Union[str, torch.device]] = None,
    show_progress: bool = True,
) -> BudgetSchedule:
    """Nested per-layer ranks of a dense model's targeted layers for each FLOPs budget.

    ``allocation="mixed"`` places ranks with the loss-weighted errors of the whitened factors
    (:func:`~nsn_peft.planning.whitened_spectra` with ``gradient_stats``; the recommended mode) and
    :func:`nested_budget_ranks`; ``"uniform"`` gives every layer the same FLOPs fraction (the largest grid
    rank within it). Both are nested. Whether mixed beats uniform depends on the model: compare them on
    validation text (e.g. with :func:`nsn_peft.refine.choose_on_validation`) and keep the uniform schedule
    when mixed is not better.

    Args:
        model: the dense model (not yet adapted).
        stats: activation statistics of the targeted layers (needed by ``"mixed"`` unless ``spectra`` is given).
        budgets: FLOPs fractions in (0, 1] of the targeted layers' dense matmul FLOPs.
        gradient_stats: output-gradient statistics (:func:`nsn_peft.collect_gradient_stats`); without them the
            mixed allocation compares plain whitened output errors, which says little about the loss.
        spectra: precomputed per-component errors ``{layer: errors}`` (skips the decompositions).
        max_rank: cap of every layer's rank (default: full rank).
        granularity: ranks are multiples of this (64 or so for fast GPU kernels; 1 = finest).

    Returns:
        A :class:`BudgetSchedule`; ``schedule.to_config_kwargs()`` gives the ``NSNConfig`` arguments.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    layers = layer_shapes(model, target_modules)
    shapes = {n: (m, d) for n, (_, m, d) in layers.items()}
    caps = {n: min(m, d) if max_rank is None else max(1, min(max_rank, m, d)) for n, (m, d) in shapes.items()}
    if allocation == "uniform":
        plans = _uniform_ranks(shapes, budgets, caps, granularity)
    else:
        if spectra is None:
            if stats is None:
                raise ValueError("allocation='mixed' needs activation statistics (stats=) or precomputed spectra=")
            if gradient_stats is None:
                logger.warning(
                    "plan_budget_schedule without gradient_stats compares whitened output errors across "
                    "layers, which says little about the loss; pass gradient_stats=collect_gradient_stats(...)"
                )
            spectra = whitened_spectra(
                model,
                stats,
                target_modules=target_modules,
                gradient_stats=gradient_stats,
                damp=damp,
                device=device,
                show_progress=show_progress,
            )
        plans = nested_budget_ranks(spectra, shapes, budgets, max_ranks=caps, granularity=granularity)
    top = max(plans)
    schedule = BudgetSchedule(
        plans, dict(plans[top]), {n: list(s) for n, s in shapes.items()}, allocation, granularity=granularity
    )
    schedule.achieved = {b: schedule.flops_fraction(b) for b in plans}
    logger.info("Budget schedule (%s): %s", allocation, {f"{b:g}": round(a, 4) for b, a in schedule.achieved.items()})
    return schedule
