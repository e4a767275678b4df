"""Rank samplers: which ranks the nested model is trained at in each optimizer step.

Every sampler is a *pure function of (seed, step)*: ``sampler.sample(step)`` draws from a generator seeded
with both, keeps no running random state and returns the same ranks for the same step in every process
and after any resume. This is what distributed data-parallel training needs: all processes run the same
ranks (hence the same forward graphs) at every step without communicating.

Ranks come from the *grid* of selectable ranks (multiples of ``NSNConfig.rank_granularity`` plus the max,
see :func:`nsn_peft.selectable_ranks`); a sampler is bound to it with :meth:`RankSampler.bind`, which
:class:`~nsn_peft.training.NSNTrainer` does for you. ``sample`` returns distinct ranks, largest first (the
largest is the teacher of self-distillation).
"""

from __future__ import annotations

import abc
import numbers
import random
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

__all__ = [
    "FixedRankSampler",
    "RankSampler",
    "SandwichRankSampler",
    "ScheduledRankSampler",
    "StagedRankSampler",
    "UniformRankSampler",
    "as_rank_sampler",
    "make_rank_sampler",
]

STATE_VERSION = 1


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class RankSampler(abc.ABC):
    """Base class: subclasses implement :meth:`_draw` (and :meth:`_config` for their parameters).

    Args:
        seed: Seed of the per-step generators; all processes of a distributed run must use the same one.
        grid: The selectable ranks, if known up front; otherwise given later by :meth:`bind`.
    """

    name = "base"

    def __init__(self, *, seed: int = 0, grid: Optional[Sequence[int]] = None) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self._grid: Optional[list[int]] = None
        if grid is not None:
            self.bind(grid)

    # -- grid ----------------------------------------------------------------------------------------
    def bind(self, grid: Sequence[int]) -> RankSampler:
        """Set the selectable ranks (ascending, distinct, positive) and validate the sampler against them."""
        ranks = [int(r) for r in grid]
        if not ranks or any(r < 1 for r in ranks) or sorted(set(ranks)) != ranks:
            raise ValueError(f"The rank grid must hold distinct positive ranks in ascending order, got {list(grid)}")
        self._grid = ranks
        self._validate_grid()
        return self

    @property
    def grid(self) -> list[int]:
        if self._grid is None:
            raise RuntimeError(
                f"{type(self).__name__} is not bound to a rank grid yet: call .bind(nsn_peft.selectable_ranks(model)) "
                "or pass it to NSNTrainer, which binds it."
            )
        return self._grid

    @property
    def is_bound(self) -> bool:
        return self._grid is not None

    def _validate_grid(self) -> None:  # noqa: B027 - an optional hook; most samplers fit any grid
        """Hook: raise ``ValueError`` if the sampler's parameters do not fit ``self.grid``."""

    # -- sampling ------------------------------------------------------------------------------------
    def rng(self, step: int) -> random.Random:
        """The generator of ``step``: seeded by a string of (seed, step), so identical on every platform."""
        return random.Random(f"nsn-rank-sampler/{self.seed}/{step}")

    def sample(self, step: int) -> list[int]:
        """Distinct grid ranks to train at in optimizer step ``step``, largest first."""
        _check_int("step", step, 0)
        ranks = [
            int(r) if isinstance(r, numbers.Integral) and not isinstance(r, bool) else r
            for r in self._draw(step, self.rng(step))
        ]
        if not ranks:
            raise ValueError(f"{type(self).__name__} returned no rank for step {step}")
        grid = set(self.grid)
        for r in ranks:
            if not isinstance(r, int) or isinstance(r, bool) or r not in grid:
                raise ValueError(
                    f"{type(self).__name__} returned rank {r!r} at step {step}, which is not a selectable rank "
                    f"(the granularity grid is {self.grid})"
                )
        return sorted(set(ranks), reverse=True)

    __call__ = sample

    @abc.abstractmethod
    def _draw(self, step: int, rng: random.Random) -> Sequence[int]:
        """The ranks of ``step`` (any order, duplicates allowed; ``sample`` validates and sorts them)."""

    # -- state ---------------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {}

    def _load_config(self, config: dict[str, Any]) -> None:
        if config != self._config():
            raise ValueError(
                f"{type(self).__name__}: checkpoint parameters {config} differ from this sampler's {self._config()}"
            )

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the type, seed, grid and parameters (sampling is step-indexed, so that is all)."""
        return {
            "version": STATE_VERSION,
            "type": self.name,
            "seed": self.seed,
            "grid": list(self._grid) if self._grid is not None else None,
            "config": self._config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the sampler type must match (parameters are restored or checked)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"Rank-sampler state has version {state.get('version')!r}; this version reads {STATE_VERSION}"
            )
        if state.get("type") != self.name:
            raise ValueError(
                f"Cannot load a '{state.get('type')}' rank-sampler state into {type(self).__name__} ('{self.name}')"
            )
        self._load_config(dict(state.get("config") or {}))
        self.seed = int(state["seed"])
        if state.get("grid") is not None:
            self.bind(state["grid"])

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({params}{', ' if params else ''}seed={self.seed})"


class UniformRankSampler(RankSampler):
    """``num_ranks`` distinct ranks drawn uniformly from the grid at every step."""

    name = "uniform"

    def __init__(self, num_ranks: int = 1, *, seed: int = 0, grid: Optional[Sequence[int]] = None) -> None:
        self.num_ranks = _check_int("num_ranks", num_ranks, 1)
        super().__init__(seed=seed, grid=grid)

    def _validate_grid(self) -> None:
        if self.num_ranks > len(self.grid):
            raise ValueError(
                f"UniformRankSampler(num_ranks={self.num_ranks}) exceeds the {len(self.grid)} selectable ranks {self.grid}"
            )

    def _draw(self, step: int, rng: random.Random) -> Sequence[int]:
        return rng.sample(self.grid, self.num_ranks)

    def _config(self) -> dict[str, Any]:
        return {"num_ranks": self.num_ranks}

    def _load_config(self, config: dict[str, Any]) -> None:
        self.num_ranks = _check_int("num_ranks", config.get("num_ranks", self.num_ranks), 1)


class SandwichRankSampler(RankSampler):
    """The "sandwich rule": the max and min ranks every step, plus ``num_random`` distinct ranks in between.

    Training the extremes each step bounds every rank in between (as in slimmable networks); the random
    middle ranks cover the rest of the grid. With fewer interior ranks than ``num_random``, all are used.
    """

    name = "sandwich"

    def __init__(self, num_random: int = 2, *, seed: int = 0, grid: Optional[Sequence[int]] = None) -> None:
        self.num_random = _check_int("num_random", num_random, 0)
        super().__init__(seed=seed, grid=grid)

    def _draw(self, step: int, rng: random.Random) -> Sequence[int]:
        grid = self.grid
        interior = grid[1:-1]
        middle = rng.sample(interior, min(self.num_random, len(interior)))
        return [grid[-1], grid[0], *middle]

    def _config(self) -> dict[str, Any]:
        return {"num_random": self.num_random}

    def _load_config(self, config: dict[str, Any]) -> None:
        self.num_random = _check_int("num_random", config.get("num_random", self.num_random), 0)


class FixedRankSampler(RankSampler):
    """The same ranks at every step (e.g. ``[576]`` for a single-rank specialist)."""

    name = "fixed"

    def __init__(self, ranks: Sequence[int], *, seed: int = 0, grid: Optional[Sequence[int]] = None) -> None:
        ranks = list(ranks)
        if not ranks:
            raise ValueError("FixedRankSampler needs at least one rank")
        for r in ranks:
            _check_int("each rank of FixedRankSampler", r, 1)
        self.ranks = sorted(set(ranks), reverse=True)
        super().__init__(seed=seed, grid=grid)

    def _validate_grid(self) -> None:
        off = [r for r in self.ranks if r not in set(self.grid)]
        if off:
            raise ValueError(
                f"FixedRankSampler ranks {off} are not selectable ranks (the granularity grid is {self.grid})"
            )

    def _draw(self, step: int, rng: random.Random) -> Sequence[int]:
        return self.ranks

    def _config(self) -> dict[str, Any]:
        return {"ranks": list(self.ranks)}

    def _load_config(self, config: dict[str, Any]) -> None:
        if "ranks" in config:
            self.ranks = sorted({int(r) for r in config["ranks"]}, reverse=True)


class ScheduledRankSampler(RankSampler):
    """A user hook: ``schedule(step)`` returns the ranks of ``step`` (a list of grid ranks).

    The hook must itself be deterministic in ``step`` (all processes call it independently); the result is
    validated against the grid at every step. ``schedule(step, rng)`` is also accepted when the callable
    takes two arguments: ``rng`` is this sampler's seeded per-step ``random.Random``.
    The callable is not serialised: pass it again when resuming (the seed and grid are restored).
    """

    name = "scheduled"

    def __init__(
        self,
        schedule: Callable[..., Sequence[int]],
        *,
        seed: int = 0,
        grid: Optional[Sequence[int]] = None,
    ) -> None:
        if not callable(schedule):
            raise ValueError(f"schedule must be callable (step -> list of ranks), got {schedule!r}")
        self.schedule = schedule
        try:
            import inspect

            params = inspect.signature(schedule).parameters.values()
            positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
            self._with_rng = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional)
        except (TypeError, ValueError):
            self._with_rng = False
        super().__init__(seed=seed, grid=grid)

    def _draw(self, step: int, rng: random.Random) -> Sequence[int]:
        ranks = self.schedule(step, rng) if self._with_rng else self.schedule(step)
        if isinstance(ranks, int):
            ranks = [ranks]
        return list(ranks)

    def _load_config(self, config: dict[str, Any]) -> None:
        return


class StagedRankSampler(RankSampler):
    """Switches between samplers at given steps: ``[(0, FixedRankSampler([576])), (100, SandwichRankSampler(2))]``.

    Each stage's sampler draws with its own seed and the global step. All stages are bound to the same grid.
    """

    name = "staged"

    def __init__(
        self, stages: Sequence[tuple[int, RankSampler]], *, seed: int = 0, grid: Optional[Sequence[int]] = None
    ) -> None:
        stages = sorted(((int(start), sampler) for start, sampler in stages), key=lambda s: s[0])
        if not stages or stages[0][0] != 0:
            raise ValueError(f"StagedRankSampler needs a stage starting at step 0, got starts {[s for s, _ in stages]}")
        starts = [s for s, _ in stages]
        if len(set(starts)) != len(starts):
            raise ValueError(f"StagedRankSampler stage starts must be distinct, got {starts}")
        for _, sampler in stages:
            if not isinstance(sampler, RankSampler):
                raise ValueError(f"Each stage needs a RankSampler, got {sampler!r}")
        self.stages = stages
        super().__init__(seed=seed, grid=grid)

    def _validate_grid(self) -> None:
        for _, sampler in self.stages:
            sampler.bind(self.grid)

    def stage(self, step: int) -> RankSampler:
        current = self.stages[0][1]
        for start, sampler in self.stages:
            if step >= start:
                current = sampler
        return current

    def _draw(self, step: int, rng: random.Random) -> Sequence[int]:
        return self.stage(step).sample(step)  # the stage's own seed, not this sampler's generator

    def _config(self) -> dict[str, Any]:
        return {"stages": [[start, sampler.state_dict()] for start, sampler in self.stages]}

    def _load_config(self, config: dict[str, Any]) -> None:
        saved = config.get("stages", [])
        if len(saved) != len(self.stages):
            raise ValueError(f"StagedRankSampler: checkpoint has {len(saved)} stages, this sampler {len(self.stages)}")
        for (start, sampler), (saved_start, saved_state) in zip(self.stages, saved):
            if int(saved_start) != start:
                raise ValueError(f"StagedRankSampler: checkpoint stage starts at {saved_start}, this one at {start}")
            sampler.load_state_dict(saved_state)


def make_rank_sampler(
    kind: str,
    *,
    seed: int = 0,
    num_ranks: int = 2,
    num_random: int = 2,
    ranks: Optional[Sequence[int]] = None,
    grid: Optional[Sequence[int]] = None,
) -> RankSampler:
    """Build a sampler from a name, for command lines: ``"uniform"``, ``"sandwich"`` or ``"fixed"``."""
    kinds: dict[str, Callable[[], RankSampler]] = {
        "uniform": lambda: UniformRankSampler(num_ranks, seed=seed, grid=grid),
        "sandwich": lambda: SandwichRankSampler(num_random, seed=seed, grid=grid),
        "fixed": lambda: FixedRankSampler(ranks or [], seed=seed, grid=grid),
    }
    if kind not in kinds:
        raise ValueError(f"Unknown rank sampler {kind!r}; choose one of {sorted(kinds)}")
    if kind == "fixed" and not ranks:
        raise ValueError("The 'fixed' rank sampler needs ranks=[...]")
    return kinds[kind]()


RankSamplerLike = Union[RankSampler, Sequence[int], Callable[[int], Sequence[int]]]


def as_rank_sampler(spec: Optional[RankSamplerLike], seed: int = 0) -> RankSampler:
    """Turn ``None`` (sandwich, 2 random), a list of ranks (fixed) or a callable (schedule) into a sampler."""
    if spec is None:
        return SandwichRankSampler(2, seed=seed)
    if isinstance(spec, RankSampler):
        return spec
    if callable(spec):
        return ScheduledRankSampler(spec, seed=seed)
    if isinstance(spec, (list, tuple)):
        return FixedRankSampler(spec, seed=seed)
    raise ValueError(f"rank_sampler must be a RankSampler, a list of ranks or a callable step -> ranks, got {spec!r}")
