"""``RankLadder``: the operating points a multi-rank run trains at, keyed by what a rank sampler draws.

Samplers, loss buckets and checkpoint state speak of ints on a grid (:mod:`.samplers`). Training uniform
ranks, a draw *is* the rank (the grid is :func:`nsn_peft.selectable_ranks`); training FLOPs budgets, a draw
is the budget's *level* ``1..K`` (1 = the smallest budget). The ladder turns a draw into the
:class:`~nsn_peft.RankSpec` the model runs at and the label logs and metrics carry (``r=256``, ``flops=0.5``),
so nothing else needs to know which kind of run it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

from torch import nn

from ..tuner.rank_spec import RankSpec, budget_key
from ..tuner.ranks import ranks_at, selectable_ranks

__all__ = ["RankLadder"]


class RankLadder:
    """Draws (ints on :attr:`grid`) → operating points; build one with :meth:`of_ranks`, :meth:`of_budgets`
    or :meth:`for_model`."""

    def __init__(self, grid: Sequence[int], specs: Sequence[RankSpec], budgets: Optional[Sequence[float]] = None) -> None:
        if len(grid) != len(specs) or not grid:
            raise ValueError(f"RankLadder needs one operating point per grid entry, got {len(grid)} and {len(specs)}")
        self.grid = [int(g) for g in grid]
        self.budgets = None if budgets is None else [float(b) for b in budgets]
        self._specs = dict(zip(self.grid, specs))

    @classmethod
    def of_ranks(cls, grid: Sequence[int]) -> RankLadder:
        """Uniform ranks: each draw is the rank itself."""
        return cls(grid, [RankSpec.rank(int(r)) for r in grid])

    @classmethod
    def of_budgets(cls, budgets: Sequence[Union[float, RankSpec]]) -> RankLadder:
        """FLOPs budgets (floats or ``RankSpec.flops``), ascending: draw ``k`` is the k-th smallest budget."""
        values = set()
        for budget in budgets:
            spec = budget if isinstance(budget, RankSpec) else RankSpec.flops(budget)
            if spec.kind != "flops":
                raise ValueError(f"budgets take FLOPs budgets (floats or RankSpec.flops), got {spec!r}")
            values.add(float(budget_key(spec.value)))
        if not values:
            raise ValueError("budgets must name at least one FLOPs budget")
        ordered = sorted(values)
        return cls(range(1, len(ordered) + 1), [RankSpec.flops(b) for b in ordered], budgets=ordered)

    @classmethod
    def for_model(cls, model: nn.Module, budgets: Optional[Sequence[Union[float, RankSpec]]] = None) -> RankLadder:
        """The model's selectable ranks, or ``budgets`` (each must have a stored plan: ``ValueError`` naming
        the budgets that have one)."""
        if budgets is None:
            return cls.of_ranks(selectable_ranks(model))
        ladder = cls.of_budgets(budgets)
        for spec in ladder._specs.values():
            ranks_at(model, spec)
        return ladder

    def spec(self, draw: int) -> RankSpec:
        """The operating point of ``draw``."""
        try:
            return self._specs[draw]
        except KeyError:
            raise ValueError(f"{draw!r} is not on this run's grid {self.grid}") from None

    def label(self, draw: int) -> str:
        """``r=256`` or ``flops=0.5``: the suffix of per-point logs and metrics."""
        return self.spec(draw).label

    def bucket_labels(self, members: Sequence[Sequence[int]]) -> list[str]:
        """Names of loss buckets (lists of draws): ``64`` / ``64-192`` for ranks, ``flops=0.5`` /
        ``flops=0.25-0.5`` for budgets (the forms checkpoints record)."""
        if self.budgets is None:
            return [str(m[0]) if len(m) == 1 else f"{m[0]}-{m[-1]}" for m in members]
        names = [[budget_key(self._specs[d].value) for d in m] for m in members]
        return [f"flops={n[0]}" if len(n) == 1 else f"flops={n[0]}-{n[-1]}" for n in names]

    def __repr__(self) -> str:
        return f"RankLadder([{', '.join(self.label(d) for d in self.grid)}])"
