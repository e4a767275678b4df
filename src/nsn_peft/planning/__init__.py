"""Rank planning: per-layer ranks for a parameter/FLOPs budget or a quality budget ε (:class:`RankPlan`), and
nested plans for several FLOPs budgets served by one adapter (:class:`BudgetSchedule`)."""

from __future__ import annotations

from .allocate import allocate_ranks_for_budget, projected_plan_for_budget, uniform_plan, whitened_spectra
from .plan import RankPlan
from .schedule import BudgetSchedule, nested_budget_ranks, plan_budget_schedule
from .search import DEFAULT_GROUPS, search_evaluations, search_ranks

__all__ = [
    "BudgetSchedule",
    "DEFAULT_GROUPS",
    "RankPlan",
    "allocate_ranks_for_budget",
    "nested_budget_ranks",
    "plan_budget_schedule",
    "projected_plan_for_budget",
    "search_evaluations",
    "search_ranks",
    "uniform_plan",
    "whitened_spectra",
]
