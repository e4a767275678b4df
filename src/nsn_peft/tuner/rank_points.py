"""Operating points of a nested model: "rank 256", "fraction 0.5", "at most 50% of the FLOPs".

Evaluation, inference and sweeps take a list of such points; each can be entered as a context (the model
runs at that point inside it) and described (ranks and FLOPs there).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import nn

from .rank_spec import RankLike, RankSpec
from .ranks import (
    at_rank,
    budget_plans,
    estimate_flops,
    get_max_rank,
    get_rank,
    ranks_at,
    select_rank_for_target_flops,
)

FULL = "full"

__all__ = ["FULL", "RankPoint", "describe_point", "resolve_rank_points"]


@dataclass(init=False)
class RankPoint:
    """One operating point of an NSN model: what was asked for (``kind``, ``value``; ``label`` names it in
    tables) and the :class:`RankSpec` the model runs at there (``spec``; ``None`` for a row that is no
    point of an NSN model, such as a compressed export).

    A FLOPs target without stored plans is asked as ``kind="flops"`` but runs at the uniform rank chosen
    for it (``spec=RankSpec.rank(...)``).
    """

    label: str
    kind: str
    value: Union[int, float, str, dict]
    spec: Optional[RankSpec]
    extra: dict[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        label: str,
        kind: str,
        value: Any,
        rank: Any = None,
        fraction: Optional[float] = None,
        extra: Optional[dict[str, Any]] = None,
        *,
        spec: Optional[RankLike] = None,
    ) -> None:
        if rank is not None or fraction is not None:
            if spec is not None:
                raise ValueError("RankPoint: pass spec= alone (rank= and fraction= are its deprecated spellings)")
            warnings.warn(
                "RankPoint(rank=..., fraction=...) is deprecated; pass spec=RankSpec.rank(...)/RankSpec.fraction(...)",
                FutureWarning,
                stacklevel=2,
            )
            spec = RankSpec.fraction(fraction) if fraction is not None else rank
        self.label, self.kind, self.value = label, kind, value
        self.spec = None if spec is None else RankSpec.coerce(spec)
        self.extra = dict(extra or {})

    @classmethod
    def of(cls, spec: RankLike, **extra: Any) -> RankPoint:
        """The point of ``spec``, labelled as :attr:`RankSpec.label` (``r=256``, ``fraction=0.5``, ``flops=0.25``)."""
        spec = RankSpec.coerce(spec)
        value = spec.mapping if spec.kind == "layers" else FULL if spec.kind == "full" else spec.value
        return cls(spec.label, spec.kind, value, spec=spec, extra=extra)

    def context(self, model: nn.Module):
        """A context manager running ``model`` at this point (the previous ranks come back on exit)."""
        if self.spec is None:
            return contextlib.nullcontext(model)
        return at_rank(model, self.spec)

    @property
    def rank(self) -> Any:
        """Deprecated: what ``set_rank`` received (an int or a dict; ``None`` for a fraction). Use :attr:`spec`."""
        warnings.warn("RankPoint.rank is deprecated; use RankPoint.spec", FutureWarning, stacklevel=2)
        if self.spec is None or self.spec.kind in ("fraction", "flops"):
            return None
        return self.spec.mapping if self.spec.kind == "layers" else self.spec.value

    @property
    def fraction(self) -> Optional[float]:
        """Deprecated: the fraction of a fraction point. Use :attr:`spec`."""
        warnings.warn("RankPoint.fraction is deprecated; use RankPoint.spec", FutureWarning, stacklevel=2)
        return self.spec.value if self.spec is not None and self.spec.kind == "fraction" else None


def resolve_rank_points(
    model: nn.Module,
    *,
    ranks: Optional[Sequence[Union[int, str]]] = None,
    fractions: Optional[Sequence[float]] = None,
    target_flops: Optional[Sequence[float]] = None,
    flops_scope: str = "model",
    default_full: bool = True,
    points: Optional[Sequence[RankLike]] = None,
) -> list[RankPoint]:
    """:class:`RankPoint` objects for ranks (``"full"`` = each layer's max), fractions, FLOPs targets and any
    :class:`RankSpec` in ``points`` (in that order).

    A FLOPs target uses the adapter's stored plan (``NSNConfig.budget_plans``) when it has plans; then every
    budget must have one. Otherwise the largest uniform grid rank within the budget (``flops_scope``) is chosen.

    Raises ``ValueError`` for a rank above the largest max rank of the model, a budget without a plan, or a
    point the model cannot run at.
    """
    maxima = get_max_rank(model)
    top = max(maxima.values())
    out: list[RankPoint] = []
    for r in ranks or []:
        if r == FULL:
            out.append(RankPoint(FULL, "rank", FULL, spec=RankSpec.full()))
        else:
            if r > top:
                raise ValueError(
                    f"rank {r} exceeds the adapter's largest max rank ({top}); use a rank <= {top} or 'full'"
                )
            out.append(RankPoint(str(r), "rank", int(r), spec=RankSpec.rank(int(r))))
    for f in fractions or []:
        out.append(RankPoint(f"fraction={f:g}", "fraction", float(f), spec=RankSpec.fraction(float(f))))
    planned = bool(target_flops) and bool(budget_plans(model))
    for f in target_flops or []:
        if planned:
            # The adapter stores nested per-layer plans: a budget names one of them (targeted-layer FLOPs).
            spec = RankSpec.flops(float(f))
            ranks_at(model, spec)  # raises, naming the budgets that have a plan
            out.append(RankPoint(f"flops={f:g} (plan)", "flops", float(f), spec=spec, extra={"budget_plan": float(f)}))
            continue
        chosen = select_rank_for_target_flops(model, float(f), scope=flops_scope)
        out.append(RankPoint(f"flops<={f:g}", "flops", float(f), spec=chosen, extra={"selected_rank": chosen}))
    for spec in points or []:
        point = RankPoint.of(spec)
        ranks_at(model, point.spec)  # raises for a point this model cannot run at
        out.append(point)
    if not out and default_full:
        out.append(RankPoint(FULL, "rank", FULL, spec=RankSpec.full()))
    return out


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
