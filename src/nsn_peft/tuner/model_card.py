"""The NSN section of the adapter's README model card: max rank, per-layer ranks, FLOPs at a few ranks."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..io import write_text
from .ranks import estimate_flops, get_max_rank, get_rank, selectable_ranks

MARKER = "## NSN adapter"


def nsn_summary_markdown(model) -> str:
    maxima = get_max_rank(model)
    current = get_rank(model)
    config = model.peft_config[model.active_adapter]
    lines = [MARKER, ""]
    lines.append(f"- Method: Nested Subspace Network factors (`nsn_peft`), init `{config.init}`")
    lines.append(
        f"- Layers factored: {len(maxima)}; max rank (config): {config.max_rank or 'full'}; "
        f"rank granularity: {config.rank_granularity}"
    )
    dense = getattr(config, "kept_dense", None)
    if dense:
        lines.append(f"- Kept dense (factoring would not save): {len(dense)} layer(s)")
    lines += ["", "| max rank | layers |", "|---:|---:|"]
    for rank, count in sorted(Counter(maxima.values()).items()):
        lines.append(f"| {rank} | {count} |")
    if current != maxima:
        lines += ["", f"Active ranks when saved: {dict(Counter(current.values()))} (rank: layers)"]
    grid = selectable_ranks(model)
    picks = sorted({grid[0], grid[len(grid) // 4], grid[len(grid) // 2], grid[(3 * len(grid)) // 4], grid[-1]})
    lines += [
        "",
        "| rank | FLOPs of factored layers vs dense | whole-model matmul FLOPs vs dense |",
        "|---:|---:|---:|",
    ]
    for r in picks:
        report = estimate_flops(model, r)
        lines.append(f"| {r} | {report.targeted_fraction:.3f} | {report.model_fraction:.3f} |")
    lines += [
        "",
        "Load with `import nsn_peft; PeftModel.from_pretrained(base, path)`; switch rank with `model.set_rank(r)`.",
        "",
    ]
    return "\n".join(lines)


TAGS = ("nsn", "nsn-peft", "nested-subspace-networks")


def _with_tags(text: str) -> str:
    """Add the NSN tags to the card's YAML front matter (what the Hub indexes and filters on)."""
    from huggingface_hub import ModelCard

    card = ModelCard(text) if text.startswith("---") else ModelCard("---\nlibrary_name: peft\n---\n" + text)
    tags = list(card.data.tags or [])
    card.data.tags = tags + [t for t in TAGS if t not in tags]
    return str(card)


def append_nsn_section(model, output_dir: str | os.PathLike) -> None:
    path = Path(output_dir) / "README.md"
    text = _with_tags(path.read_text(encoding="utf-8") if path.exists() else "")
    if MARKER in text:
        text = text[: text.index(MARKER)].rstrip() + "\n\n"
    write_text(path, text + nsn_summary_markdown(model))
