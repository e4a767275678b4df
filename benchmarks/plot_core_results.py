"""Plot the layer-speed results (``results/layer_speed.json``) as time ratio vs FLOPs fraction.

python benchmarks/plot_core_results.py benchmarks/results/layer_speed.json docs/img/layer_speed.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    rows = json.loads(args.results.read_text())["rows"]
    shapes = sorted({(r["in"], r["out"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), sharey=True)
    for ax, (d, m) in zip(axes, shapes):
        for tokens in sorted({r["tokens"] for r in rows}):
            sel = sorted(
                (r for r in rows if (r["in"], r["out"]) == (d, m) and r["tokens"] == tokens),
                key=lambda r: r["flops_fraction"],
            )
            ax.plot(
                [r["flops_fraction"] for r in sel], [r["time_ratio"] for r in sel], marker="o", label=f"{tokens} tokens"
            )
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal (time = FLOPs)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{d} → {m}")
        ax.set_xlabel("FLOPs fraction of the rank")
    axes[0].set_ylabel("time / dense time (bf16, H100)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
