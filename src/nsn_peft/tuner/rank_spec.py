"""``RankSpec``: which operating point a nested model runs at, and the one function that turns it into ranks.

An operating point is said in one of five ways: one rank for every layer (clamped to each layer's max rank),
a fraction of each layer's max rank, a stored FLOPs budget (a plan of ``NSNConfig.budget_plans``), a mapping
``{module name or pattern: rank}``, or every layer's max rank. ``set_rank``, ``at_rank``, ``estimate_flops``,
``compile_for_ranks``, rank points, the trainer's budgets and rank plans all take a :class:`RankSpec` (or
what :meth:`RankSpec.coerce` reads as one: an int, a mapping, ``"full"``).

:func:`resolve_ranks` is pure: it sees the layers' max ranks (and, for a mapping, their current ranks), the
rank granularity and the budget plans, never a model, so every caller resolves a point the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..linalg.flops import fraction_rank
from ..naming import lookup_pattern

__all__ = ["RankLike", "RankSpec", "active_rank_field", "budget_key", "plan_for_budget", "resolve_ranks"]

KINDS = ("rank", "fraction", "flops", "layers", "full")


def budget_key(budget: float) -> str:
    """The :attr:`NSNConfig.budget_plans` key of a FLOPs budget (``0.5`` -> ``"0.5"``; rounding noise ignored)."""
    return f"{round(float(budget), 6):g}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_unit_fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1 or math.isnan(value):
        raise ValueError(f"{what}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RankSpec:
    """Which operating point an NSN model runs at; build one with the class methods.

    ``RankSpec.rank(256)`` (every layer, clamped to its max rank), ``RankSpec.fraction(0.5)`` (of each
    layer's max rank, rounded down to the ``rank_granularity`` grid), ``RankSpec.flops(0.25)`` (the stored
    plan of that FLOPs budget), ``RankSpec.layers({"up_proj": 64})`` (named layers or patterns; the others
    keep their rank), ``RankSpec.full()`` (every layer's max rank). ``str(spec)`` is its label: ``r=256``,
    ``fraction=0.5``, ``flops=0.25``, ``full``, ``layers(2)``.
    """

    kind: str
    value: Any = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"RankSpec kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "rank" and (not _is_int(self.value) or self.value < 1):
            raise ValueError(f"rank must be a positive int (or a dict of them), got {self.value!r}")
        if self.kind == "fraction":
            object.__setattr__(self, "value", _check_unit_fraction(self.value, "fraction must be in (0, 1]"))
        if self.kind == "flops":
            object.__setattr__(
                self, "value", _check_unit_fraction(self.value, "flops must be a FLOPs fraction in (0, 1]")
            )
        if self.kind == "layers":
            items = tuple(self.value.items()) if isinstance(self.value, Mapping) else self.value
            if not isinstance(items, tuple) or not all(isinstance(i, tuple) and len(i) == 2 for i in items):
                raise ValueError(
                    f"RankSpec.layers needs a mapping {{module name or pattern: rank}}, got {self.value!r}"
                )
            for key, rank in items:
                if not isinstance(key, str) or not _is_int(rank) or rank < 1:
                    raise ValueError(f"RankSpec.layers: rank {rank!r} for {key!r} must be a positive int")
            object.__setattr__(self, "value", items)  # the order matters: the first matching pattern wins
        if self.kind == "full" and self.value is not None:
            raise ValueError(f"RankSpec.full() takes no value, got {self.value!r}")

    # -- the five ways to say it -----------------------------------------------------------------------
    @classmethod
    def rank(cls, rank: int) -> RankSpec:
        return cls("rank", rank)

    @classmethod
    def fraction(cls, fraction: float) -> RankSpec:
        return cls("fraction", fraction)

    @classmethod
    def flops(cls, budget: float) -> RankSpec:
        return cls("flops", budget)

    @classmethod
    def layers(cls, ranks: Mapping[str, int]) -> RankSpec:
        return cls("layers", ranks)

    @classmethod
    def full(cls) -> RankSpec:
        return cls("full")

    @classmethod
    def coerce(cls, value: RankLike) -> RankSpec:
        """``value`` as a spec: a spec stays, an int is a rank, a mapping per-layer ranks, ``"full"`` the max.

        A bare float raises: it could mean a fraction of the max rank or a FLOPs budget.
        """
        if isinstance(value, RankSpec):
            return value
        if _is_int(value):
            return cls.rank(value)
        if isinstance(value, Mapping):
            return cls.layers(value)
        if value == "full":
            return cls.full()
        if isinstance(value, float):
            raise ValueError(
                f"A bare float ({value!r}) does not say which operating point it is: pass "
                f"RankSpec.fraction({value!r}) (of each layer's max rank) or RankSpec.flops({value!r}) (a stored budget)."
            )
        raise ValueError(f"rank must be a positive int (or a dict of them), got {value!r}")

    @classmethod
    def from_arguments(
        cls, rank: Optional[RankLike] = None, *, fraction: Optional[float] = None, flops: Optional[float] = None
    ) -> RankSpec:
        """The spec of ``set_rank(rank)``, ``set_rank(fraction=f)`` or ``set_rank(flops=b)`` (exactly one)."""
        if sum(x is not None for x in (rank, fraction, flops)) != 1:
            raise ValueError("Pass exactly one of `rank`, `fraction=` or `flops=`.")
        if fraction is not None:
            return cls.fraction(fraction)
        if flops is not None:
            return cls.flops(flops)
        return cls.coerce(rank)

    # -- reading it back -------------------------------------------------------------------------------
    @property
    def mapping(self) -> dict[str, int]:
        """The ``{module name or pattern: rank}`` of a ``layers`` spec."""
        if self.kind != "layers":
            raise ValueError(f"{self} is not a per-layer spec")
        return dict(self.value)

    @property
    def label(self) -> str:
        if self.kind == "rank":
            return f"r={self.value}"
        if self.kind == "fraction":
            return f"fraction={self.value:g}"
        if self.kind == "flops":
            return f"flops={budget_key(self.value)}"
        if self.kind == "layers":
            return f"layers({len(self.value)})"
        return "full"

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        if self.kind == "full":
            return "RankSpec.full()"
        value = self.mapping if self.kind == "layers" else self.value
        return f"RankSpec.{self.kind}({value!r})"


RankLike = Union[RankSpec, int, Mapping[str, int], str]


def plan_for_budget(plans: Mapping[str, Mapping[str, int]], budget: float) -> dict[str, int]:
    """The plan of ``budget`` among ``plans`` (keyed by :func:`budget_key`); ``ValueError`` naming those there are."""
    plan = plans.get(budget_key(budget))
    if plan is not None:
        return dict(plan)
    if not plans:
        raise ValueError(
            f"No budget plan for flops={budget:g}: this adapter stores none (NSNConfig.budget_plans is empty). "
            "Create plans with nsn_peft.plan_budget_schedule(...), or pick uniform ranks with "
            "select_rank_for_target_flops(model, fraction)."
        )
    available = ", ".join(sorted(plans, key=float))
    raise ValueError(f"No budget plan for flops={budget:g}; this adapter has plans for the FLOPs budgets {available}")


def resolve_ranks(
    spec: RankLike,
    max_ranks: Mapping[str, int],
    *,
    current: Optional[Mapping[str, int]] = None,
    granularity: int = 64,
    budget_plans: Optional[Mapping[str, Mapping[str, int]]] = None,
) -> dict[str, int]:
    """The rank of every layer of ``max_ranks`` at ``spec``: ``{module name: rank}``, each in ``[1, max rank]``.

    Args:
        max_ranks: ``{module name: max rank}`` of the layers.
        current: their current ranks, which the layers a ``layers`` spec does not name keep (default: max).
        granularity: the rank grid of ``fraction`` specs (``NSNConfig.rank_granularity``).
        budget_plans: ``NSNConfig.budget_plans`` (keys as :func:`budget_key` writes them), for ``flops`` specs.

    Raises ``ValueError`` for a budget without a plan, a plan or mapping that names unknown layers or a
    rank outside ``[1, max rank]``, or a mapping key that matches no layer.
    """
    spec = RankSpec.coerce(spec)
    if spec.kind == "full":
        return dict(max_ranks)
    if spec.kind == "rank":
        r = spec.value
        return {name: min(r, limit) for name, limit in max_ranks.items()}
    if spec.kind == "fraction":
        by_limit = {limit: fraction_rank(spec.value, limit, granularity) for limit in set(max_ranks.values())}
        return {name: by_limit[limit] for name, limit in max_ranks.items()}
    if spec.kind == "flops":
        plan = plan_for_budget(budget_plans or {}, spec.value)
        key = budget_key(spec.value)
        missing = [n for n in max_ranks if n not in plan]
        extra = [n for n in plan if n not in max_ranks]
        if missing or extra:
            raise ValueError(
                f"Budget plan {key} does not match the model's NSN layers: "
                + (f"no rank for {missing[:3]}" if missing else f"ranks for unknown layers {extra[:3]}")
            )
        for name, limit in max_ranks.items():
            if not 1 <= plan[name] <= limit:
                raise ValueError(
                    f"Budget plan {key} gives '{name}' rank {plan[name]}, outside [1, {limit}] (its max rank)"
                )
        return {name: plan[name] for name in max_ranks}
    wanted = spec.mapping
    for key in wanted:
        if key not in max_ranks and not any(lookup_pattern({key: 0}, n) for n in max_ranks):
            raise ValueError(f"set_rank: '{key}' matches no NSN layer; layers are e.g. {list(max_ranks)[:4]}")
    ranks = dict(current if current is not None else max_ranks)
    for name, limit in max_ranks.items():
        key = lookup_pattern(wanted, name)
        if key is not None:
            if not 1 <= wanted[key] <= limit:
                raise ValueError(f"Rank {wanted[key]!r} for '{name}' is outside [1, {limit}] (its max rank)")
            ranks[name] = wanted[key]
    return ranks


def active_rank_field(ranks: Mapping[str, int], max_ranks: Mapping[str, int]) -> Union[None, int, dict[str, int]]:
    """What ``NSNConfig.active_rank`` records for layers at ``ranks``: ``None`` at every max rank, one int when
    that int (clamped to each layer's max) gives every layer its rank, else the per-layer mapping."""
    if all(ranks[n] == max_ranks[n] for n in ranks):
        return None
    top = max(ranks.values())
    if all(min(top, max_ranks[n]) == r for n, r in ranks.items()):
        return top
    return dict(ranks)
