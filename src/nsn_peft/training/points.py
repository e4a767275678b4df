"""The operating points a multi-rank run trains and evaluates: uniform ranks, or stored FLOPs budgets.

A run over budgets names its points by *level* ``1..K`` (1 = the smallest budget), so rank samplers, loss buckets,
logs and checkpoint state work the same for both: a point is always a positive int on an ascending grid, and
:meth:`TrainingPoints.spec` gives the :class:`~nsn_peft.RankSpec` the model runs at there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Optional, Union

from torch import nn

from ..tuner.rank_spec import RankSpec, budget_key
from ..tuner.ranks import at_rank, ranks_at, selectable_ranks
from .loss import RankBuckets

__all__ = ["TrainingPoints"]


class TrainingPoints:
    """The grid of points of one model: ``selectable_ranks(model)``, or budget levels ``1..len(budgets)``.

    Args:
        model: The model holding NSN layers.
        budgets: FLOPs budgets with a stored plan (``NSNConfig.budget_plans``; floats or ``RankSpec.flops``), or
            ``None`` for uniform ranks. Raises ``ValueError`` naming the budgets that have a plan when one has none.
    """

    def __init__(self, model: nn.Module, budgets: Optional[Sequence[Union[float, RankSpec]]] = None) -> None:
        self.model = model
        self.budgets: Optional[list[float]] = None
        if budgets is not None:
            specs = [b if isinstance(b, RankSpec) else RankSpec.flops(b) for b in budgets]
            wrong = [s for s in specs if s.kind != "flops"]
            if wrong:
                raise ValueError(f"budgets take FLOPs budgets (floats or RankSpec.flops), got {wrong[0]!r}")
            self.budgets = sorted({float(budget_key(s.value)) for s in specs})
            if not self.budgets:
                raise ValueError("budgets must name at least one FLOPs budget")
            for b in self.budgets:
                ranks_at(model, RankSpec.flops(b))  # raises, naming the budgets that have a plan
        self.grid: list[int] = list(range(1, len(self.budgets) + 1)) if self.budgets else selectable_ranks(model)

    @property
    def top(self) -> int:
        return self.grid[-1]

    def spec(self, point: int) -> RankSpec:
        """The operating point of grid entry ``point``: ``RankSpec.rank(point)``, or with budgets the
        ``RankSpec.flops`` of budget level ``point``."""
        return RankSpec.flops(self.budgets[point - 1]) if self.budgets else RankSpec.rank(point)

    def at(self, point: int) -> contextlib.AbstractContextManager:
        """Context running the model at grid rank ``point`` (with budgets: at budget level ``point``)."""
        return at_rank(self.model, self.spec(point))

    def label(self, point: int) -> str:
        """``"r=256"``, or ``"flops=0.5"`` with budgets: the suffix of per-point logs and metrics."""
        return self.spec(point).label

    def bucket_labels(self, buckets: RankBuckets) -> list[str]:
        """Names of loss buckets: ``"8"``/``"8-16"`` for ranks, ``"flops=0.5"``/``"flops=0.25-0.5"`` for budgets."""
        if not self.budgets:
            return buckets.labels
        names = [[budget_key(self.budgets[r - 1]) for r in m] for m in buckets.members]
        return [f"flops={m[0]}" if len(m) == 1 else f"flops={m[0]}-{m[-1]}" for m in names]

    def logvar_key(self, bucket_label: str) -> str:
        """Log key of a bucket's log-variance: ``logvar@r=8`` or ``logvar@flops=0.5``."""
        return f"logvar@{bucket_label}" if self.budgets else f"logvar@r={bucket_label}"
