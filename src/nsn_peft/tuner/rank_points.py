"""Operating points of a nested model: "rank 256", "fraction 0.5", "at most 50% of the FLOPs".

Evaluation, inference and sweeps take a list of such points; each can be entered as a context (the model
runs at that point inside it) and described (ranks and FLOPs there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import nn

from .ranks import (
    at_rank,
    budget_plan,
    budget_plans,
    estimate_flops,
    get_max_rank,
    get_rank,
    select_rank_for_target_flops,
)

FULL = "full"

__all__ = ["FULL", "RankPoint", "describe_point", "resolve_rank_points"]


@dataclass
class RankPoint:
    """One operating point of an NSN model: ``kind`` is ``"rank"``, ``"fraction"`` or ``"flops"``."""

    label: str
    kind: str
    value: Union[int, float, str]
    rank: Any = None  # what set_rank receives (int / dict), None for fraction
    fraction: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def context(self, model: nn.Module):
        """A context manager running ``model`` at this point (the previous ranks come back on exit)."""
        if self.fraction is not None:
            return at_rank(model, fraction=self.fraction)
        return at_rank(model, self.rank)


def resolve_rank_points(
    model: nn.Module,
    *,
    ranks: Optional[Sequence[Union[int, str]]] = None,
    fractions: Optional[Sequence[float]] = None,
    target_flops: Optional[Sequence[float]] = None,
    flops_scope: str = "model",
    default_full: bool = True,
) -> list[RankPoint]:
    """:class:`RankPoint` objects for ranks (``"full"`` = each layer's max), fractions and FLOPs budgets.

    A FLOPs budget uses the adapter's stored plan (``NSNConfig.budget_plans``) when it has plans; then every
    budget must have one. Otherwise the largest uniform grid rank within the budget (``flops_scope``) is chosen.

    Raises ``ValueError`` for a rank above the largest max rank of the model, or a budget without a plan.
    """
    maxima = get_max_rank(model)
    top = max(maxima.values())
    points: list[RankPoint] = []
    for r in ranks or []:
        if r == FULL:
            points.append(RankPoint(FULL, "rank", FULL, rank=top))
        else:
            if r > top:
                raise ValueError(f"rank {r} exceeds the adapter's largest max rank ({top}); use a rank <= {top} or 'full'")
            points.append(RankPoint(str(r), "rank", int(r), rank=int(r)))
    for f in fractions or []:
        points.append(RankPoint(f"fraction={f:g}", "fraction", float(f), fraction=float(f)))
    planned = bool(target_flops) and bool(budget_plans(model))
    for f in target_flops or []:
        if planned:
            # The adapter stores nested per-layer plans: a budget names one of them (targeted-layer FLOPs).
            plan = budget_plan(model, float(f))
            points.append(RankPoint(f"flops={f:g} (plan)", "flops", float(f), rank=dict(plan), extra={"budget_plan": float(f)}))
            continue
        chosen = select_rank_for_target_flops(model, float(f), scope=flops_scope)
        points.append(RankPoint(f"flops<={f:g}", "flops", float(f), rank=chosen, extra={"selected_rank": chosen}))
    if not points and default_full:
        points.append(RankPoint(FULL, "rank", FULL, rank=top))
    return points


def describe_point(model: nn.Module, point: RankPoint) -> dict[str, Any]:
    """Ranks and FLOPs of ``model`` at ``point`` (call inside ``point.context(model)``)."""
    values = list(get_rank(model).values())
    report = estimate_flops(model)
    info = {
        "label": point.label,
        "kind": point.kind,
        "value": point.value,
        "mean_rank": sum(values) / len(values),
        "min_rank": min(values),
        "max_rank": max(values),
        "targeted_flops_fraction": report.targeted_fraction,
        "model_flops_fraction": report.model_fraction,
        "flops_per_token": report.model,
    }
    info.update(point.extra)
    return info
