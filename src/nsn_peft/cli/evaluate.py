"""``nsn-peft eval`` (perplexity at one or several ranks) and ``nsn-peft sweep`` (metric vs rank/FLOPs + plot)."""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
from pathlib import Path
from typing import Any, Optional

from ..devices import resolve_device
from ..tuner.rank_points import RankPoint, describe_point
from .inputs import check_data_ref, check_output_file, model_for_inference, read_adapter_config, resolve_rank_points
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

CSV_COLUMNS = [
    "label", "kind", "value", "mean_rank", "min_rank", "max_rank",
    "targeted_flops_fraction", "model_flops_fraction", "flops_per_token", "perplexity", "vs_dense",
]


def _add_model_source(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser, task=False)
    parser.add_argument(
        "--adapter", default=None, metavar="DIR",
        help="NSN adapter folder; without it the --model is adapted on the fly with the options below.",
    )
    add_adapter_creation_options(parser, title="on-the-fly adapter (without --adapter)")
    add_serving_options(parser)


def _add_rank_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ranks")
    group.add_argument("--ranks", type=rank_list, default=None, metavar="LIST", help="Ranks, e.g. 64,128,full.")
    group.add_argument(
        "--fractions", type=csv_floats, default=None, metavar="LIST",
        help="Fractions of each layer's max rank, e.g. 0.25,0.5 (rounded down to the rank grid).",
    )
    group.add_argument(
        "--target-flops", type=csv_floats, default=None, metavar="LIST",
        help="FLOPs budgets as fractions of the dense model, e.g. 0.5,0.75: the largest grid rank within each.",
    )
    group.add_argument(
        "--flops-scope", default="model", choices=["model", "targeted"],
        help="What --target-flops budgets: all matmuls of the model or only the factored layers.",
    )
    group.add_argument(
        "--baseline", action=argparse.BooleanOptionalAction, default=None,
        help="Also evaluate the dense base model (adapter disabled), shown beside every rank and on the plot "
        "(default: on, except for a compressed model, which has no dense weights left; --no-baseline skips it).",
    )
    group.add_argument("--stride", type=positive_int, default=None, help="Sliding-window stride (default: --seq-len).")


def register(subparsers: Any) -> dict[str, argparse.ArgumentParser]:
    ev = _new_eval(subparsers)
    sw = _new_sweep(subparsers)
    return {"eval": ev, "sweep": sw}


def _new_eval(subparsers: Any) -> argparse.ArgumentParser:
    from .options import new_command

    parser = new_command(
        subparsers,
        "eval",
        summary="Perplexity at one or several ranks.",
        description=(
            "Evaluate the perplexity of an NSN model on text data at one or several ranks (--ranks), rank "
            "fractions (--fractions) or FLOPs budgets (--target-flops). Without --adapter the base model is "
            "adapted on the fly (SVD, exact at full rank)."
        ),
        examples=[
            "--adapter ./nsn-adapter --data ./valid.txt --ranks 64,128,full",
            "--model HuggingFaceTB/SmolLM2-135M --data wikitext:wikitext-2-raw-v1 --target-flops 0.5,0.75 --baseline",
        ],
    )
    _add_model_source(parser)
    add_data_options(parser)
    _add_rank_options(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", default=None, metavar="FILE", help="Also write the results to this JSON file.")
    add_overwrite_option(out)
    add_common_options(parser)
    parser.set_defaults(func=run_eval)
    return parser


def _new_sweep(subparsers: Any) -> argparse.ArgumentParser:
    from .options import new_command

    parser = new_command(
        subparsers,
        "sweep",
        summary="Perplexity vs rank or FLOPs fraction: CSV, PNG plot and JSON.",
        description=(
            "Evaluate an NSN model over a grid of ranks (default: up to --points ranks of the rank grid) or FLOPs "
            "budgets, and write <prefix>.csv, <prefix>.png (perplexity vs rank or FLOPs) and <prefix>.json."
        ),
        examples=[
            "--adapter ./nsn-adapter --data ./valid.txt --output-dir ./sweep",
            "--model ./model.gguf --data ./docs --target-flops 0.25,0.5,0.75,1 --x flops --output-dir ./sweep",
        ],
    )
    _add_model_source(parser)
    add_data_options(parser)
    _add_rank_options(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", "-o", default=None, metavar="DIR", help="Folder for the CSV, PNG and JSON (required).")
    out.add_argument("--prefix", default="sweep", help="File name stem of the outputs.")
    out.add_argument("--points", type=positive_int, default=8, help="Grid ranks evaluated when no ranks are given.")
    out.add_argument("--x", default=None, choices=["rank", "flops"], help="Plot x axis (default: flops for --target-flops, else rank).")
    out.add_argument("--log-y", action=argparse.BooleanOptionalAction, default=None, help="Log-scale y axis (default: auto).")
    out.add_argument("--title", default=None, help="Plot title.")
    add_overwrite_option(out)
    add_common_options(parser)
    parser.set_defaults(func=run_sweep)
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
        model, texts, tokenizer=tokenizer, seq_len=args.seq_len, stride=args.stride, max_tokens=args.max_tokens,
        batch_size=args.batch_size, device=resolve_device(args.device), show_progress=progress_enabled(),
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
        limit = f" (--max-tokens {args.max_tokens})" if args.max_tokens is not None and args.max_tokens < args.seq_len else ""
        raise UsageError(
            f"--data {args.data} gives {count} tokens{limit}, fewer than --seq-len {args.seq_len}: not one full window "
            "to evaluate; give more text or a smaller --seq-len"
        )
    return count


def _check_source(args: argparse.Namespace) -> None:
    if args.adapter:
        read_adapter_config(args.adapter)


def evaluate_points(args: argparse.Namespace, model: Any, tokenizer: Any, texts: list[str], points: list[RankPoint]) -> list[dict[str, Any]]:
    """Perplexity and FLOPs of ``model`` at every point (progress bar over the points)."""
    rows = []
    for point in progress(points, desc="Evaluating ranks", unit="rank", disable=len(points) < 2 or None):
        with point.context(model):
            row = describe_point(model, point)
            row.update(_perplexity(args, model, tokenizer, texts))
        logger.info("%s: perplexity %.4f", point.label, row["perplexity"])
        rows.append(row)
    return rows


def _baseline(args: argparse.Namespace, model: Any, tokenizer: Any, texts: list[str]) -> Optional[float]:
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


def _with_baseline(rows: list[dict[str, Any]], baseline: Optional[float]) -> list[dict[str, Any]]:
    """Each row gets ``vs_dense``: its perplexity divided by the dense model's (``None`` without a baseline)."""
    for row in rows:
        row["vs_dense"] = row["perplexity"] / baseline if baseline else None
    return rows


def _rows_text(rows: list[dict[str, Any]], baseline: Optional[float], tokens: Optional[int] = None) -> str:
    table_rows = [(r["label"], round(r["mean_rank"], 1), round(r["model_flops_fraction"], 4), round(r["perplexity"], 4))
                  + ((f"{r['vs_dense']:.3f}×",) if baseline else ()) for r in rows]
    headers = ["rank", "mean rank", "FLOPs vs dense", "perplexity"] + (["vs dense"] if baseline else [])
    if baseline is not None:
        table_rows.append(("dense", "-", 1.0, round(baseline, 4), "1.000×"))
    table = format_table(table_rows, headers, align="lrrrr"[: len(headers)])
    if tokens:
        table += f"\n\n{tokens:,} tokens scored" + ("" if baseline is not None else " (dense baseline skipped)")
    return table


def run_eval(args: argparse.Namespace) -> CommandResult:
    from ..io import write_json

    output = check_output_file(args.output, args.overwrite) if args.output else None
    _check_source(args)
    texts = load_texts(args)
    check_enough_tokens(args, None, texts)  # obviously too short: said before the model loads
    model, tokenizer, ref = model_for_inference(args, allow_compressed=True)
    check_enough_tokens(args, tokenizer, texts)
    if not nsn_layers(model):  # a compressed model: fixed ranks
        if args.ranks or args.fractions or args.target_flops:
            raise UsageError("--ranks/--fractions/--target-flops need an NSN model; a compressed model runs at fixed ranks")
        rows = [{"label": "compressed", "kind": "compressed", "value": None, **fixed_rank_flops(model),
                 **_perplexity(args, model, tokenizer, texts)}]
    else:
        points = resolve_rank_points(
            model, ranks=args.ranks, fractions=args.fractions, target_flops=args.target_flops, flops_scope=args.flops_scope
        )
        rows = evaluate_points(args, model, tokenizer, texts, points)
    baseline = _baseline(args, model, tokenizer, texts)
    rows = _with_baseline(rows, baseline)
    data = {"model": ref, "adapter": args.adapter, "data": args.data, "results": rows, "baseline_perplexity": baseline}
    if output is not None:
        write_json(output, data)
    return CommandResult(data, _rows_text(rows, baseline, rows[0].get("tokens") if rows else None))


# ---------------------------------------------------------------------------------------------------------
def fixed_rank_flops(model: Any) -> dict[str, Any]:
    """Ranks and FLOPs of a compressed model (its :class:`~nsn_peft.export.FactoredLinear` layers)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from ..export.compressed import FactoredLinear
    from ..linalg.flops import dense_flops, factored_flops

    ranks, factored, dense_of_factored, other = [], 0, 0, 0
    for module in model.modules():
        if isinstance(module, FactoredLinear):
            ranks.append(module.rank)
            factored += factored_flops(module.out_features, module.in_features, module.rank)
            dense_of_factored += dense_flops(module.out_features, module.in_features)
        elif isinstance(module, nn.Linear):
            other += dense_flops(module.out_features, module.in_features)
        elif isinstance(module, Conv1D):
            other += dense_flops(module.weight.shape[1], module.weight.shape[0])
    if not ranks:
        raise ValueError("the model has neither NSN nor factored layers")
    return {
        "mean_rank": sum(ranks) / len(ranks), "min_rank": min(ranks), "max_rank": max(ranks),
        "targeted_flops_fraction": factored / dense_of_factored,
        "model_flops_fraction": (factored + other) / (dense_of_factored + other),
        "flops_per_token": factored + other,
    }


def _default_sweep_ranks(model: Any, points: int) -> list[int]:
    from ..tuner.ranks import selectable_ranks

    grid = selectable_ranks(model)
    if len(grid) <= points:
        return grid
    if points == 1:
        return [grid[-1]]
    picks = {grid[round(i * (len(grid) - 1) / (points - 1))] for i in range(points)}
    return sorted(picks)


def render_plot(rows: list[dict[str, Any]], baseline: Optional[float], *, x: str, title: str, log_y: Optional[bool]) -> bytes:
    """PNG bytes of perplexity against mean rank (``x="rank"``) or whole-model FLOPs fraction (``x="flops"``)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    key = "mean_rank" if x == "rank" else "model_flops_fraction"
    ordered = sorted(rows, key=lambda r: r[key])
    xs = [r[key] for r in ordered]
    ys = [r["perplexity"] for r in ordered]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        ax.plot(xs, ys, marker="o", label="NSN")
        if baseline is not None:
            ax.axhline(baseline, color="gray", linestyle="--", label=f"dense ({baseline:.3g})")
            if x == "flops":
                ax.plot([1.0], [baseline], marker="s", color="gray", linestyle="none")
        finite = [y for y in ys + ([baseline] if baseline else []) if y and math.isfinite(y) and y > 0]
        if log_y or (log_y is None and finite and max(finite) / min(finite) > 10):
            ax.set_yscale("log")
        ax.set_xlabel("mean rank of factored layers" if x == "rank" else "FLOPs vs dense model (all matmuls)")
        ax.set_ylabel("perplexity")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(fig)


def rows_to_csv(rows: list[dict[str, Any]], baseline: Optional[float]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    if baseline is not None:
        writer.writerow({"label": "dense", "kind": "baseline", "value": "", "perplexity": baseline,
                         "targeted_flops_fraction": 1.0, "model_flops_fraction": 1.0, "vs_dense": 1.0})
    return buffer.getvalue()


def run_sweep(args: argparse.Namespace) -> CommandResult:
    import json

    from ..io import atomic_directory

    out_dir = Path(args.output_dir) if args.output_dir else None
    required(args, "output_dir")
    names = [f"{args.prefix}.{ext}" for ext in ("csv", "png", "json")]
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output-dir {out_dir} is not a folder")
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{out_dir / existing[0]} exists; pass --overwrite to replace it")
    _check_source(args)
    texts = load_texts(args)
    check_enough_tokens(args, None, texts)
    model, tokenizer, ref = model_for_inference(args)
    check_enough_tokens(args, tokenizer, texts)
    ranks = args.ranks
    if not ranks and not args.fractions and not args.target_flops:
        ranks = _default_sweep_ranks(model, args.points)
    points = resolve_rank_points(
        model, ranks=ranks, fractions=args.fractions, target_flops=args.target_flops, flops_scope=args.flops_scope
    )
    rows = evaluate_points(args, model, tokenizer, texts, points)
    baseline = _baseline(args, model, tokenizer, texts)
    rows = _with_baseline(rows, baseline)
    x = args.x or ("flops" if args.target_flops and not args.ranks else "rank")
    title = args.title or f"{Path(str(ref)).name if ref else 'model'}: perplexity vs {'FLOPs' if x == 'flops' else 'rank'}"
    png = render_plot(rows, baseline, x=x, title=title, log_y=args.log_y)
    data = {
        "model": ref, "adapter": args.adapter, "data": args.data, "x": x, "results": rows, "baseline_perplexity": baseline,
        "files": {ext: str(out_dir / n) for ext, n in zip(("csv", "png", "json"), names)},
    }
    # The three files replace their namesakes in one transaction; other files of the folder are kept.
    with atomic_directory(out_dir) as staging:
        (staging / names[0]).write_text(rows_to_csv(rows, baseline), encoding="utf-8")
        (staging / names[1]).write_bytes(png)
        (staging / names[2]).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    text = _rows_text(rows, baseline, rows[0].get("tokens") if rows else None) + "\n\nWrote " + ", ".join(data["files"].values())
    return CommandResult(data, text)
