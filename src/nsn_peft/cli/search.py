"""``nsn-peft search-ranks``: per-layer ranks from a perplexity tolerance (ε) or a FLOPs budget → rank plan JSON."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ..devices import resolve_device
from ..hub import base_model_reference
from .inputs import check_output_file, check_stats_dir, check_target_modules, load_base
from .options import (
    PROG,
    UsageError,
    add_common_options,
    add_data_options,
    add_model_options,
    add_overwrite_option,
    epsilon_text,
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
        summary="Choose per-layer ranks: within a perplexity tolerance (--epsilon) or a FLOPs budget.",
        description=(
            "Choose per-layer ranks from activation statistics. Budget mode (--target-fraction) spreads a FLOPs "
            "(= parameter) budget of the targeted layers over them where it costs least: each layer's whitened "
            "truncation errors, weighted by their effect on the loss when the stats folder holds output-gradient "
            "statistics (`calibrate --gradients`, recommended) (no --data needed; plan init: whitened). "
            "Epsilon mode (--epsilon, e.g. 0.5%) searches, group by group (attention, MLP), the smallest utilized-rank "
            "energy that keeps the perplexity on --data within (1+ε) of the dense model's (plan init: projected); it "
            "runs up to 2 + groups × --max-steps perplexity evaluations of --max-tokens tokens each, and prints the "
            "time they will take after the first. Writes a rank plan JSON for `adapt --rank-plan` and `compress`."
        ),
        examples=[
            "--stats ./stats --target-fraction 0.5 --output plan.json",
            "--stats ./stats --data ./valid.txt --epsilon 2% --max-tokens 8192 --max-steps 4 --output plan.json",
        ],
    )
    add_model_options(parser, task=False)
    parser.add_argument("--stats", default=None, metavar="DIR", help="Activation statistics folder (required).")
    parser.add_argument(
        "--target-modules", type=module_list, default=None, metavar="NAMES",
        help="Layers to plan (comma-separated names, 'all-linear' or 're:<regex>'; default: all linear layers).",
    )
    mode = parser.add_argument_group("mode (exactly one)")
    mode.add_argument("--target-fraction", type=unit_fraction, default=None, help="FLOPs budget of the targeted layers vs dense.")
    mode.add_argument(
        "--epsilon", type=epsilon_text, default=None, metavar="TOL",
        help="Allowed perplexity increase over the dense model, as a percentage (0.5%%) or a fraction (0.005); "
        "a bare number is a fraction: 0.1 means 10%%, not 0.1%%.",
    )
    tune = parser.add_argument_group("search")
    tune.add_argument("--granularity", type=positive_int, default=None, help="Budget mode: rank step per layer (default: 1).")
    tune.add_argument(
        "--no-gradients", action="store_true",
        help="Budget mode: ignore the stats folder's output-gradient statistics (compare normalised output errors).",
    )
    tune.add_argument("--max-steps", type=positive_int, default=8, help="Epsilon mode: bisection steps per layer group.")
    tune.add_argument("--min-energy", type=open_unit_fraction, default=0.5, help="Epsilon mode: lowest energy tried, in (0, 1).")
    add_data_options(parser, required=False, seq_len=512, max_tokens=32768)
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
        raise UsageError("pass exactly one of --epsilon (perplexity tolerance) or --target-fraction (FLOPs budget)")
    required(args, "stats")
    check_stats_dir(args.stats)
    texts = None
    if args.epsilon is not None:
        if not args.data:
            raise UsageError("--epsilon needs --data to measure perplexity on")
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
    device = resolve_device(args.device)
    epsilon = None
    if args.epsilon is not None:
        from .. import evaluation

        epsilon, as_percent = parse_epsilon(args.epsilon)
        if not as_percent and epsilon >= 0.05:
            logger.warning("--epsilon %s is a fraction: it allows a %g%% perplexity increase (write %s%% for %s percent)",
                           args.epsilon, epsilon * 100, args.epsilon, args.epsilon)
        evaluations = rank_search.search_evaluations(model, target_modules=args.target_modules, max_steps=args.max_steps)
        timer = {"calls": 0}

        def eval_fn(m: Any) -> float:
            start = time.perf_counter()
            value = float(evaluation.perplexity(m, texts, tokenizer=tokenizer, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                                batch_size=args.batch_size, device=device))
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
            model, stats, eval_fn, epsilon, target_modules=args.target_modules, max_steps=args.max_steps,
            min_energy=args.min_energy, show_progress=progress_enabled(),
        )
    else:
        kwargs = {"granularity": args.granularity} if args.granularity else {}
        gradient_dir = Path(args.stats) / GRADIENT_STATS_SUBDIR
        if gradient_dir.is_dir() and not args.no_gradients:
            kwargs["gradient_stats"] = ActivationStats.load(gradient_dir)
        plan = rank_search.allocate_ranks_for_budget(
            model, stats, args.target_fraction, target_modules=args.target_modules, **kwargs
        )
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
    if data["mode"] == "epsilon":
        dense, planned = plan.target.get("baseline", float("nan")), plan.target.get("metric", float("nan"))
        lines.append(f"  perplexity: dense {dense:.4f}, planned {planned:.4f} (+{(planned / dense - 1) * 100:.2f}%; "
                     f"allowed: ε = {epsilon * 100:g}%, i.e. ≤ {dense * (1 + epsilon):.4f})")
    if plan.ranks:
        rows, more = clip_rows(sorted(plan.ranks.items(), key=lambda kv: _natural_key(kv[0])))
        lines += ["", format_table(rows, ["layer", "rank"])] + ([more] if more else [])
    return CommandResult(data, "\n".join(lines))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


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
            shapes[key] = (int(w.shape[1]), int(w.shape[0])) if isinstance(module, Conv1D) else (int(w.shape[0]), int(w.shape[1]))
    return shapes
