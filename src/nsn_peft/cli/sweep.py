"""``nsn-peft sweep``: perplexity vs rank or FLOPs fraction, written as CSV, PNG plot and JSON."""

from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path
from typing import Any, Optional

from .evaluate import (
    add_model_source,
    add_rank_options,
    check_budgets,
    check_enough_tokens,
    check_source,
    dense_baseline,
    evaluate_points,
    flops_budgets,
    load_texts,
    resolve_window,
    rows_text,
    with_baseline,
)
from .inputs import model_for_inference, resolve_rank_points
from .options import UsageError, add_common_options, add_data_options, add_overwrite_option, positive_int, required
from .output import CommandResult

CSV_COLUMNS = [
    "label",
    "kind",
    "value",
    "mean_rank",
    "min_rank",
    "max_rank",
    "targeted_flops_fraction",
    "model_flops_fraction",
    "flops_per_token",
    "perplexity",
    "vs_dense",
]


def register(subparsers: Any) -> dict[str, argparse.ArgumentParser]:
    return {"sweep": new_sweep(subparsers)}


def new_sweep(subparsers: Any) -> argparse.ArgumentParser:
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
    add_model_source(parser)
    add_data_options(parser)
    parser.set_defaults(seq_len=None)  # 512, or 2048 under --ppl-protocol standard
    for action in parser._actions:
        if action.dest == "seq_len":
            action.help = "Tokens per window (default: 512; 2048 with --ppl-protocol standard)."
    add_rank_options(parser)
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output-dir", "-o", default=None, metavar="DIR", help="Folder for the CSV, PNG and JSON (required)."
    )
    out.add_argument("--prefix", default="sweep", help="File name stem of the outputs.")
    out.add_argument("--points", type=positive_int, default=8, help="Grid ranks evaluated when no ranks are given.")
    out.add_argument(
        "--x",
        default=None,
        choices=["rank", "flops"],
        help="Plot x axis (default: flops for --target-flops, else rank).",
    )
    out.add_argument(
        "--log-y", action=argparse.BooleanOptionalAction, default=None, help="Log-scale y axis (default: auto)."
    )
    out.add_argument("--title", default=None, help="Plot title.")
    add_overwrite_option(out)
    add_common_options(parser)
    parser.set_defaults(func=run_sweep)
    return parser


def _default_sweep_ranks(model: Any, points: int) -> list[int]:
    from ..tuner.ranks import selectable_ranks

    grid = selectable_ranks(model)
    if len(grid) <= points:
        return grid
    if points == 1:
        return [grid[-1]]
    picks = {grid[round(i * (len(grid) - 1) / (points - 1))] for i in range(points)}
    return sorted(picks)


def render_plot(
    rows: list[dict[str, Any]], baseline: Optional[float], *, x: str, title: str, log_y: Optional[bool]
) -> bytes:
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
        writer.writerow(
            {
                "label": "dense",
                "kind": "baseline",
                "value": "",
                "perplexity": baseline,
                "targeted_flops_fraction": 1.0,
                "model_flops_fraction": 1.0,
                "vs_dense": 1.0,
            }
        )
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
    resolve_window(args)
    check_source(args)
    texts = load_texts(args)
    check_enough_tokens(args, None, texts)
    model, tokenizer, ref = model_for_inference(args)
    check_enough_tokens(args, tokenizer, texts)
    ranks = args.ranks
    if not ranks and not args.fractions and not flops_budgets(args):
        ranks = _default_sweep_ranks(model, args.points)
    check_budgets(args, model)
    points = resolve_rank_points(
        model, ranks=ranks, fractions=args.fractions, target_flops=flops_budgets(args), flops_scope=args.flops_scope
    )
    rows = evaluate_points(args, model, tokenizer, texts, points)
    baseline = dense_baseline(args, model, tokenizer, texts)
    rows = with_baseline(rows, baseline)
    x = args.x or ("flops" if flops_budgets(args) and not args.ranks else "rank")
    title = (
        args.title or f"{Path(str(ref)).name if ref else 'model'}: perplexity vs {'FLOPs' if x == 'flops' else 'rank'}"
    )
    png = render_plot(rows, baseline, x=x, title=title, log_y=args.log_y)
    data = {
        "model": ref,
        "adapter": args.adapter,
        "data": args.data,
        "x": x,
        "results": rows,
        "baseline_perplexity": baseline,
        "perplexity_protocol": args.ppl_protocol,
        "seq_len": args.seq_len,
        "files": {ext: str(out_dir / n) for ext, n in zip(("csv", "png", "json"), names)},
    }
    # The three files replace their namesakes in one transaction; other files of the folder are kept.
    with atomic_directory(out_dir) as staging:
        (staging / names[0]).write_text(rows_to_csv(rows, baseline), encoding="utf-8")
        (staging / names[1]).write_bytes(png)
        (staging / names[2]).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    text = (
        rows_text(rows, baseline, rows[0].get("tokens") if rows else None)
        + "\n\nWrote "
        + ", ".join(data["files"].values())
    )
    return CommandResult(data, text)
