"""Task accuracy as a picture: mean accuracy against the FLOPs fraction, the dense model as a line."""

from __future__ import annotations

import io
from typing import Optional

from .results import TaskEvaluation

__all__ = ["plot_accuracy"]


def plot_accuracy(result: TaskEvaluation, *, title: Optional[str] = None, per_task: bool = True) -> bytes:
    """PNG bytes: the mean of the tasks' primary metrics (± standard error) at each operating point against the
    whole model's FLOPs fraction, the dense model as a dashed line, chance as a dotted one, and (``per_task``)
    each task faintly."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    points = sorted(
        (p for p in result.points if p.info.get("model_flops_fraction") is not None),
        key=lambda p: p.info["model_flops_fraction"],
    )
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        xs = [p.info["model_flops_fraction"] for p in points]
        if per_task and points:
            for name in points[0].scores:
                ax.plot(xs, [p.scores[name].value for p in points], color="gray", alpha=0.25, lw=1)
        errors = [p.mean_stderr or 0.0 for p in points]
        ax.errorbar(xs, [p.mean for p in points], yerr=errors, marker="o", capsize=3, label="mean accuracy")
        for p in points:
            ax.annotate(
                p.label, (p.info["model_flops_fraction"], p.mean), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
        if result.dense is not None:
            ax.axhline(result.dense.mean, color="black", ls="--", lw=1, label=f"dense ({result.dense.mean:.3f})")
        chance = points[0].mean_chance if points else None
        if chance is not None:
            ax.axhline(chance, color="gray", ls=":", lw=1, label=f"chance ({chance:.3f})")
        ax.set_xlabel("FLOPs vs dense model (all matmuls)")
        metrics = sorted({s.metric for p in points for s in p.scores.values()})
        ax.set_ylabel(f"mean zero-shot accuracy ({'/'.join(metrics)})")
        names = ", ".join(t.name for t in result.tasks)
        ax.set_title(title or f"{len(result.tasks)} tasks: {names}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(fig)
