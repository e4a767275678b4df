"""Rank sweep of a causal LM: perplexity of one NSN adapter at every rank of its grid, against rank and FLOPs.

Adapts the model once (SVD init by default, or the activation-aware ``--init whitened``), then evaluates held-out
perplexity at up to ``--points`` ranks of the rank grid plus the dense model, and writes ``rank_sweep.csv``,
``rank_sweep.json`` and ``rank_sweep.png`` (perplexity vs rank and vs whole-model FLOPs) to ``--output-dir``.
Runs offline: the default model is the embedded SmolLM2-135M-Instruct and the default text the Python
tutorial sources installed with Python.

    # on an H100 (about a minute)
    python examples/rank_sweep.py --device cuda --max-rank 576 --points 9 --output-dir runs/rank_sweep
    # quick CPU run on a local model and text file
    python examples/rank_sweep.py --model ./tiny-model --data valid.txt --points 2 --max-tokens 256 --seq-len 16

The CLI does the same with ``nsn-peft sweep``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger("rank_sweep")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model id/folder/.gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--data", default=None, help="text file/folder/JSONL or datasets name (default: the Python tutorial)"
    )
    p.add_argument("--calib-data", default=None, help="calibration text for --init whitened (default: --data)")
    p.add_argument("--init", choices=["svd", "whitened"], default="svd")
    p.add_argument("--max-rank", type=int, default=None, help="max rank of the factors (default: full rank)")
    p.add_argument("--granularity", type=int, default=64, help="rank grid step")
    p.add_argument("--points", type=int, default=8, help="ranks of the grid to evaluate (spread evenly)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=32768, help="evaluation tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--output-dir", default="runs/rank_sweep")
    args = p.parse_args(argv)
    for name in ("granularity", "points", "seq_len", "max_tokens", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_rank is not None and args.max_rank < 1:
        p.error("--max-rank must be >= 1")
    return args


def spread(grid: list[int], points: int) -> list[int]:
    """Up to ``points`` ranks of ``grid``, evenly spaced, always including the smallest and the largest."""
    if len(grid) <= points:
        return list(grid)
    if points == 1:
        return [grid[-1]]
    return sorted({grid[round(i * (len(grid) - 1) / (points - 1))] for i in range(points)})


def plot(rows: list[dict[str, Any]], dense: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for ax, key, label in ((left, "rank", "rank"), (right, "model_flops_fraction", "FLOPs vs dense model")):
        ax.plot([r[key] for r in rows], [r["perplexity"] for r in rows], marker="o", label="NSN")
        ax.axhline(dense, color="gray", linestyle="--", label=f"dense ({dense:.2f})")
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity")
        values = [r["perplexity"] for r in rows] + [dense]
        if max(values) / min(values) > 10:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    import torch
    from peft import get_peft_model

    import nsn_peft
    from nsn_peft.data import load_texts, python_docs_dir
    from nsn_peft.evaluation import perplexity
    from nsn_peft.hub import load_model_and_tokenizer
    from nsn_peft.io import atomic_path, write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    texts = load_texts(args.data if args.data else python_docs_dir("tutorial"))
    base, tokenizer = load_model_and_tokenizer(args.model, device=device)

    def ppl(model: Any) -> float:
        return perplexity(
            model,
            texts,
            tokenizer=tokenizer,
            seq_len=args.seq_len,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            device=device,
        )

    dense = ppl(base)
    logger.info("dense perplexity %.3f", dense)
    config = nsn_peft.NSNConfig(max_rank=args.max_rank, rank_granularity=args.granularity, init=args.init)
    if args.init == "whitened":
        from nsn_peft.calibrate.collect import collect_activation_stats

        calib = load_texts(args.calib_data) if args.calib_data else texts
        config.stats = collect_activation_stats(
            base,
            calib,
            tokenizer=tokenizer,
            max_tokens=args.max_tokens,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            device=device,
        )
    model = get_peft_model(base, config).eval()

    rows = []
    for rank in spread(model.selectable_ranks(), args.points):
        with nsn_peft.at_rank(model, rank):
            report = model.estimate_flops()
            rows.append(
                {
                    "rank": rank,
                    "perplexity": ppl(model),
                    "targeted_flops_fraction": report.targeted_fraction,
                    "model_flops_fraction": report.model_fraction,
                }
            )
        logger.info(
            "rank %d: perplexity %.3f at %.3f of dense FLOPs",
            rank,
            rows[-1]["perplexity"],
            rows[-1]["model_flops_fraction"],
        )

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "rank_sweep.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_json(
        out / "rank_sweep.json",
        {
            "model": args.model or "embedded SmolLM2-135M-Instruct",
            "init": args.init,
            "dense_perplexity": dense,
            "results": rows,
        },
    )
    with atomic_path(out / "rank_sweep.png") as tmp:
        plot(rows, dense, tmp, f"{Path(str(args.model or 'SmolLM2-135M')).name}, {args.init} init")
    print(f"{'rank':>6} {'FLOPs':>7} {'perplexity':>11}")
    for r in rows:
        print(f"{r['rank']:>6} {r['model_flops_fraction']:>7.3f} {r['perplexity']:>11.3f}")
    print(f" dense   1.000 {dense:>11.3f}\nwrote {out}/rank_sweep.{{csv,json,png}}")
    if not all(math.isfinite(r["perplexity"]) for r in rows):
        logger.warning("some perplexities are not finite")
    return rows


if __name__ == "__main__":
    main()
