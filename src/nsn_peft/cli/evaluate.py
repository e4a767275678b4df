"""``nsn-peft eval``: perplexity or task accuracy at one or several ranks, the dense model beside.

The task-accuracy path lives in :mod:`.evaluate_tasks`; ``sweep`` (:mod:`.sweep`) shares the options and the
perplexity helpers defined here."""

from __future__ import annotations

import argparse
import logging
from typing import Any, Optional

from ..tuner.rank_points import RankPoint, describe_point
from .inputs import (
    check_data_ref,
    check_output_file,
    compute_device,
    model_for_inference,
    read_adapter_config,
    resolve_rank_points,
)
from .options import (
    UsageError,
    add_adapter_creation_options,
    add_common_options,
    add_data_options,
    add_model_options,
    add_overwrite_option,
    add_serving_options,
    csv_floats,
    positive_int,
    rank_list,
    required,
)
from .output import CommandResult, format_table
from .runtime import progress, progress_enabled

logger = logging.getLogger(__name__)


def add_model_source(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser, task=False)
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="NSN adapter folder; without it the --model is adapted on the fly with the options below.",
    )
    add_adapter_creation_options(parser, title="on-the-fly adapter (without --adapter)")
    add_serving_options(parser)


def add_rank_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ranks")
    group.add_argument("--ranks", type=rank_list, default=None, metavar="LIST", help="Ranks, e.g. 64,128,full.")
    group.add_argument(
        "--fractions",
        type=csv_floats,
        default=None,
        metavar="LIST",
        help="Fractions of each layer's max rank, e.g. 0.25,0.5 (rounded down to the rank grid).",
    )
    group.add_argument(
        "--target-flops",
        type=csv_floats,
        default=None,
        metavar="LIST",
        help="FLOPs budgets as fractions of the dense model, e.g. 0.5,0.75: the largest grid rank within each.",
    )
    group.add_argument(
        "--budgets",
        type=csv_floats,
        default=None,
        metavar="LIST",
        help="Stored budget plans of the adapter (FLOPs fractions of its targeted layers), e.g. 0.5,0.8.",
    )
    group.add_argument(
        "--flops-scope",
        default="model",
        choices=["model", "targeted"],
        help="What --target-flops budgets: all matmuls of the model or only the factored layers.",
    )
    group.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Also evaluate the dense base model (adapter disabled), shown beside every rank and on the plot "
        "(default: on, except for a compressed model, which has no dense weights left; --no-baseline skips it).",
    )
    group.add_argument("--stride", type=positive_int, default=None, help="Sliding-window stride (default: --seq-len).")
    group.add_argument(
        "--ppl-protocol",
        default="nsn",
        choices=["nsn", "standard"],
        help="Perplexity protocol: nsn (EOS between documents, --seq-len windows, default) or standard (the papers': "
        "documents joined with blank lines, no EOS, 2048-token windows unless --seq-len, partial last window dropped).",
    )


def register(subparsers: Any) -> dict[str, argparse.ArgumentParser]:
    return {"eval": _new_eval(subparsers)}


def _new_eval(subparsers: Any) -> argparse.ArgumentParser:
    from .options import new_command

    parser = new_command(
        subparsers,
        "eval",
        summary="Perplexity on text (--data) or zero-shot task accuracy (--tasks) at one or several ranks.",
        description=(
            "Evaluate an NSN model at one or several ranks (--ranks), rank fractions (--fractions), FLOPs budgets "
            "(--target-flops) or stored budget plans (--budgets), with the dense model beside every row: perplexity "
            "on --data, or zero-shot accuracy on --tasks scored by lm-eval-harness (acc, acc_norm, standard errors, "
            "the mean, and the share of the dense model's above-chance accuracy kept). Without --adapter the base "
            "model is adapted on the fly for rank options (SVD, exact at full rank); with --tasks and no rank "
            "option the model (or a compressed export) is scored as it is."
        ),
        examples=[
            "--adapter ./nsn-adapter --data ./valid.txt --ranks 64,128,full",
            "--model HuggingFaceTB/SmolLM2-135M --data wikitext:wikitext-2-raw-v1 --ppl-protocol standard",
            "--adapter ./nsn-adapter --tasks arc_easy,hellaswag,piqa --limit 500 --ranks 128,full --plot acc.png",
            "--tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa --limit 500",
        ],
    )
    add_model_source(parser)
    add_data_options(parser)
    parser.set_defaults(seq_len=None)  # 512, or 2048 under --ppl-protocol standard
    for action in parser._actions:
        if action.dest == "seq_len":
            action.help = "Tokens per window (default: 512; 2048 with --ppl-protocol standard)."
    add_rank_options(parser)
    from .evaluate_tasks import add_task_options

    add_task_options(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", default=None, metavar="FILE", help="Also write the results to this JSON file.")
    add_overwrite_option(out)
    add_common_options(parser)
    parser.set_defaults(func=run_eval)
    return parser


# ---------------------------------------------------------------------------------------------------------
def nsn_layers(model: Any) -> dict[str, Any]:
    from ..tuner.ranks import nsn_layers as _nsn_layers

    return _nsn_layers(model)


def load_texts(args: argparse.Namespace) -> list[str]:
    """Texts of ``--data`` (through :func:`nsn_peft.data.load_texts`)."""
    required(args, "data")
    check_data_ref(args.data)
    from .. import data

    texts = data.load_texts(args.data, split=args.split, text_field=args.text_field, max_docs=args.max_docs)
    if not texts:
        raise UsageError(f"--data {args.data} holds no text")
    return texts


def _perplexity(args: argparse.Namespace, model: Any, tokenizer: Any, texts: list[str]) -> dict[str, float]:
    """``{"perplexity", "nll", "tokens"}`` of ``model`` on ``texts`` (sliding window)."""
    from .. import evaluation

    result = evaluation.evaluate_perplexity(
        model,
        texts,
        tokenizer=tokenizer,
        seq_len=args.seq_len,
        stride=args.stride,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        device=compute_device(args),
        show_progress=progress_enabled(),
        protocol=getattr(args, "ppl_protocol", "nsn"),
    )
    return {"perplexity": float(result["perplexity"]), "nll": float(result["nll"]), "tokens": int(result["tokens"])}


def check_enough_tokens(args: argparse.Namespace, tokenizer: Any, texts: list[str]) -> int:
    """Usage error unless ``--data`` fills at least one window of ``--seq-len`` tokens (after ``--max-tokens``).

    A perplexity over a few tokens of a partial window is noise, and not comparable with any other result.
    Without a tokenizer (before the model is loaded) a safe upper bound is used: no tokenizer makes more than
    two tokens per byte of text, plus one end-of-document token each.
    """
    from ..data import token_stream

    if tokenizer is None:
        count = sum(2 * len(text.encode("utf-8")) + 1 for text in texts)
        if args.max_tokens is not None:
            count = min(count, args.max_tokens)
    else:
        count = int(token_stream(texts, tokenizer, args.max_tokens).numel())
    if count < args.seq_len:
        limit = (
            f" (--max-tokens {args.max_tokens})"
            if args.max_tokens is not None and args.max_tokens < args.seq_len
            else ""
        )
        raise UsageError(
            f"--data {args.data} gives {count} tokens{limit}, fewer than --seq-len {args.seq_len}: not one full window "
            "to evaluate; give more text or a smaller --seq-len"
        )
    return count


def check_source(args: argparse.Namespace) -> None:
    if args.adapter:
        read_adapter_config(args.adapter)


def evaluate_points(
    args: argparse.Namespace, model: Any, tokenizer: Any, texts: list[str], points: list[RankPoint]
) -> list[dict[str, Any]]:
    """Perplexity and FLOPs of ``model`` at every point (progress bar over the points)."""
    rows = []
    for point in progress(points, desc="Evaluating ranks", unit="rank", disable=len(points) < 2 or None):
        with point.context(model):
            row = describe_point(model, point)
            row.update(_perplexity(args, model, tokenizer, texts))
        logger.info("%s: perplexity %.4f", point.label, row["perplexity"])
        rows.append(row)
    return rows


def dense_baseline(args: argparse.Namespace, model: Any, tokenizer: Any, texts: list[str]) -> Optional[float]:
    """Perplexity of the dense model (adapter disabled): on by default, skipped where there is none."""
    if args.baseline is False:
        return None
    if not hasattr(model, "disable_adapter"):
        if args.baseline:
            raise UsageError("--baseline needs an NSN model (a compressed model has no dense weights left)")
        return None
    if args.baseline is None and _dense_weights_unavailable(model):
        logger.info("Dense baseline skipped: the model runs from its factors only (--no-keep-base-weights)")
        return None
    with model.disable_adapter():
        return _perplexity(args, model, tokenizer, texts)["perplexity"]


def _dense_weights_unavailable(model: Any) -> bool:
    """Whether some adapted layer dropped a dense weight that its factors cannot rebuild exactly."""
    for layer in nsn_layers(model).values():
        try:
            layer.check_base_weight_recoverable(next((n for n in layer.active_adapters if n in layer.nsn_A), None))
        except RuntimeError:
            return True
    return False


def with_baseline(rows: list[dict[str, Any]], baseline: Optional[float]) -> list[dict[str, Any]]:
    """Each row gets ``vs_dense``: its perplexity divided by the dense model's (``None`` without a baseline)."""
    for row in rows:
        row["vs_dense"] = row["perplexity"] / baseline if baseline else None
    return rows


def rows_text(rows: list[dict[str, Any]], baseline: Optional[float], tokens: Optional[int] = None) -> str:
    table_rows = [
        (r["label"], round(r["mean_rank"], 1), round(r["model_flops_fraction"], 4), round(r["perplexity"], 4))
        + ((f"{r['vs_dense']:.3f}×",) if baseline else ())
        for r in rows
    ]
    headers = ["rank", "mean rank", "FLOPs vs dense", "perplexity"] + (["vs dense"] if baseline else [])
    if baseline is not None:
        table_rows.append(("dense", "-", 1.0, round(baseline, 4), "1.000×"))
    table = format_table(table_rows, headers, align="lrrrr"[: len(headers)])
    if tokens:
        table += f"\n\n{tokens:,} tokens scored" + ("" if baseline is not None else " (dense baseline skipped)")
    return table


def resolve_window(args: argparse.Namespace) -> None:
    """``--seq-len`` left out: the protocol's window (512, or 2048 for the standard protocol)."""
    if getattr(args, "seq_len", None) is None:
        args.seq_len = 2048 if getattr(args, "ppl_protocol", "nsn") == "standard" else 512


def flops_budgets(args: argparse.Namespace) -> Optional[list[float]]:
    """``--target-flops`` and ``--budgets`` together (both go to the rank points; budgets need stored plans)."""
    budgets = list(args.target_flops or []) + list(getattr(args, "budgets", None) or [])
    return budgets or None


def check_budgets(args: argparse.Namespace, model: Any) -> None:
    from ..tuner.ranks import budget_plans

    if getattr(args, "budgets", None) and not budget_plans(model):
        raise UsageError(
            "--budgets needs an adapter with stored budget plans (trained or refined for several budgets); "
            "--target-flops picks a uniform rank within a FLOPs budget instead"
        )


def run_eval(args: argparse.Namespace) -> CommandResult:
    from ..io import write_json

    if args.tasks:
        from .evaluate_tasks import run_task_eval

        return run_task_eval(args)
    if not args.data:
        raise UsageError("eval needs --data (perplexity on text) or --tasks (accuracy on benchmarks)")
    for option in ("limit", "plot", "include_path"):
        if getattr(args, option, None):
            raise UsageError(f"--{option.replace('_', '-')} goes with --tasks")
    resolve_window(args)
    output = check_output_file(args.output, args.overwrite) if args.output else None
    check_source(args)
    texts = load_texts(args)
    check_enough_tokens(args, None, texts)  # obviously too short: said before the model loads
    model, tokenizer, ref = model_for_inference(args, allow_compressed=True)
    check_enough_tokens(args, tokenizer, texts)
    if not nsn_layers(model):  # a compressed model: fixed ranks
        if args.ranks or args.fractions or flops_budgets(args):
            raise UsageError(
                "--ranks/--fractions/--target-flops/--budgets need an NSN model; a compressed model runs at fixed ranks"
            )
        rows = [
            {
                "label": "compressed",
                "kind": "compressed",
                "value": None,
                **fixed_rank_flops(model),
                **_perplexity(args, model, tokenizer, texts),
            }
        ]
    else:
        check_budgets(args, model)
        points = resolve_rank_points(
            model,
            ranks=args.ranks,
            fractions=args.fractions,
            target_flops=flops_budgets(args),
            flops_scope=args.flops_scope,
        )
        rows = evaluate_points(args, model, tokenizer, texts, points)
    baseline = dense_baseline(args, model, tokenizer, texts)
    rows = with_baseline(rows, baseline)
    data = {
        "model": ref,
        "adapter": args.adapter,
        "data": args.data,
        "results": rows,
        "baseline_perplexity": baseline,
        "perplexity_protocol": args.ppl_protocol,
        "seq_len": args.seq_len,
    }
    if output is not None:
        write_json(output, data)
    return CommandResult(data, rows_text(rows, baseline, rows[0].get("tokens") if rows else None))


# ---------------------------------------------------------------------------------------------------------
def fixed_rank_flops(model: Any) -> dict[str, Any]:
    """Ranks and FLOPs of a compressed model (:func:`nsn_peft.evaluation.flops.compressed_flops`)."""
    from ..evaluation.flops import compressed_flops

    return compressed_flops(model)
