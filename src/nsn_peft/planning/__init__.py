"""Rank planning: per-layer ranks for a parameter/FLOPs budget or a quality budget ε, as a :class:`RankPlan`."""

from __future__ import annotations

from .allocate import allocate_ranks_for_budget, projected_plan_for_budget, uniform_plan, whitened_spectra
from .plan import RankPlan
from .search import DEFAULT_GROUPS, search_evaluations, search_ranks

__all__ = [
    "DEFAULT_GROUPS",
    "RankPlan",
    "allocate_ranks_for_budget",
    "projected_plan_for_budget",
    "search_evaluations",
    "search_ranks",
    "uniform_plan",
    "whitened_spectra",
]
