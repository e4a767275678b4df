"""``nsn-peft search-ranks``: per-layer ranks from a perplexity tolerance (ε) or a FLOPs budget → rank plan JSON."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import (
    CommandResult,
    UsageError,
    add_common_options,
    add_data_options,
    add_model_options,
    add_overwrite_option,
    check_output_file,
    check_stats_dir,
    format_table,
    lazy_import,
    load_base,
    model_ref_for_saving,
    new_command,
    positive_float,
    resolve_device,
    unit_fraction,
)


def register(subparsers: Any) -> dict[str, argparse.ArgumentParser]:
    parser = new_command(
        subparsers,
        "search-ranks",
        summary="Choose per-layer ranks: within a perplexity tolerance (--epsilon) or a FLOPs budget.",
        description=(
            "Search per-layer ranks for the utilized-rank pipeline. ε mode (--epsilon) keeps the perplexity on "
            "--data within (1+ε) of the dense model's; budget mode (--target-fraction) spreads a FLOPs budget "
            "over the layers from the activation statistics alone (no --data needed). Writes a rank plan JSON "
            "for `adapt --rank-plan` and `compress`."
        ),
        examples=[
            "--stats ./stats --target-fraction 0.5 --output plan.json",
            "--model HuggingFaceTB/SmolLM2-135M --stats ./stats --data ./valid.txt --epsilon 0.02 --output plan.json",
        ],
    )
    add_model_options(parser, task=False)
    parser.add_argument("--stats", default=None, metavar="DIR", help="Activation statistics folder (required).")
    mode = parser.add_argument_group("mode (exactly one)")
    mode.add_argument("--epsilon", type=positive_float, default=None, help="Allowed relative perplexity increase (ε mode).")
    mode.add_argument("--target-fraction", type=unit_fraction, default=None, help="FLOPs budget vs dense, in (0, 1].")
    add_data_options(parser, required=False, seq_len=512, max_tokens=32768)
    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", default=None, metavar="FILE", help="Rank plan JSON to write (required).")
    add_overwrite_option(out)
    add_common_options(parser)
    parser.set_defaults(func=run)
    return {"search-ranks": parser}


def run(args: argparse.Namespace) -> CommandResult:
    from ..stats import ActivationStats

    output = check_output_file(args.output, args.overwrite)
    if (args.epsilon is None) == (args.target_fraction is None):
        raise UsageError("pass exactly one of --epsilon (perplexity tolerance) or --target-fraction (FLOPs budget)")
    if args.stats is None:
        raise UsageError("the following arguments are required: --stats")
    check_stats_dir(args.stats)
    texts = None
    if args.epsilon is not None:
        if not args.data:
            raise UsageError("--epsilon needs --data to measure perplexity on")
        from .evaluate import load_texts

        texts = load_texts(args)
    rank_search = lazy_import("rank_search", "search-ranks")
    model, tokenizer = load_base(args, task="causal-lm")
    stats = ActivationStats.load(args.stats)
    if args.epsilon is not None:
        evaluation = lazy_import("evaluation", "search-ranks --epsilon")
        device = resolve_device(args.device)

        def eval_fn(m: Any) -> float:
            return float(evaluation.perplexity(m, texts, tokenizer=tokenizer, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                               batch_size=args.batch_size, device=device))

        plan = rank_search.search_ranks(model, stats, eval_fn, args.epsilon)
    else:
        plan = rank_search.allocate_ranks_for_budget(model, stats, args.target_fraction)
    plan.save(output)
    ranks = dict(getattr(plan, "ranks", {}) or {})
    data = {"output": str(output), "model": model_ref_for_saving(args.model, args.gguf_file), "mode": "epsilon" if args.epsilon else "budget",
            "layers": len(ranks), "ranks": ranks}
    for key in ("flops_fraction", "perplexity", "baseline_perplexity"):
        if getattr(plan, key, None) is not None:
            data[key] = getattr(plan, key)
    text = f"Saved rank plan for {len(ranks)} layers to {output}"
    if ranks:
        text += "\n\n" + format_table(sorted(ranks.items()), ["layer", "rank"])
    return CommandResult(data, text)
