"""The model card (README.md) of a compressed export: what it is, how it was made, how to use it, what was measured."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..linalg.flops import dense_flops, factored_flops

__all__ = ["export_model_card", "layer_sizes"]


def layer_sizes(state: dict[str, torch.Tensor], layout: dict) -> dict[str, tuple[int, int]]:
    return {
        name: (state[f"{name}.up.weight"].shape[0], state[f"{name}.down.weight"].shape[1])
        for name in layout["nsn_ranks"]
    }


def export_model_card(
    config,
    layout: dict,
    state: dict[str, torch.Tensor],
    architecture: str,
    metrics: Optional[dict],
    source: Optional[str],
    dtype: torch.dtype,
) -> str:
    """README.md: what the model is, how it was made, how to use it, and what was measured."""
    sizes = layer_sizes(state, layout)
    ranks = layout["nsn_ranks"]
    dense_of_factored = sum(dense_flops(m, d) for m, d in sizes.values())
    factored = sum(factored_flops(m, d, ranks[n]) for n, (m, d) in sizes.items())
    stored = sum(factored_flops(m, d, layout["nsn_max_ranks"][n]) for n, (m, d) in sizes.items())
    params = sum(t.numel() for t in state.values())
    lines = ["---", "library_name: transformers", "tags:", "- nsn-peft", "- low-rank", "- compressed"]
    if source and not Path(source).is_absolute():
        lines.append(f"base_model: {source}")
    lines += ["---", "", f"# Compressed {architecture}", ""]
    lines.append(
        f"{len(ranks)} linear layers of {source or 'the base model'} are replaced by low-rank factors (two `nn.Linear` each, "
        f"`down` then `up`), made with [nsn-peft](https://github.com/) from the model's Nested Subspace Network adapter "
        f"(data-aware factors, ranks chosen per layer). Everything else is the base architecture unchanged."
    )
    lines += [
        "",
        f"- Parameters: {params:,} ({str(dtype).removeprefix('torch.')})",
        f"- Factored layers: {len(ranks)}, ranks {min(ranks.values(), default=0)}–{max(ranks.values(), default=0)} "
        f"(mean {sum(ranks.values()) / max(len(ranks), 1):.1f})",
        f"- Their matmul FLOPs and parameters: {factored / max(dense_of_factored, 1):.3f} of dense at the active ranks"
        + (f", {stored / max(dense_of_factored, 1):.3f} stored" if stored != factored else ""),
    ]
    if layout["nsn_dense_layers"]:
        lines.append(f"- Written dense (factors would not be smaller): {len(layout['nsn_dense_layers'])} layer(s)")
    plans = layout.get("nsn_budget_plans") or {}
    if plans:
        lines += [
            "",
            "## Budgets (one checkpoint, every size)",
            "",
            "| FLOPs budget | factored layers' FLOPs vs dense | mean rank |",
            "|---:|---:|---:|",
        ]
        for key in sorted(plans, key=float):
            plan = plans[key]
            flops = sum(factored_flops(m, d, plan.get(n, layout["nsn_max_ranks"][n])) for n, (m, d) in sizes.items())
            lines.append(
                f"| {key} | {flops / max(dense_of_factored, 1):.3f} | {sum(plan.values()) / max(len(plan), 1):.1f} |"
            )
        lines += [
            "",
            f"Active budget when saved: {layout.get('nsn_active_budget')}. Switch with `model.set_budget(0.5)`; "
            "`model.budgets()` lists them.",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>", trust_remote_code=True)',
        "# int8 weight-only quantization reaches the factors (they are nn.Linear):",
        "# from torchao.quantization import quantize_, Int8WeightOnlyConfig; quantize_(model, Int8WeightOnlyConfig())",
        "```",
        "",
        "## Measured",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [
            f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
            for key, value in metrics.items()
        ]
    else:
        lines.append(
            "Nothing was measured at export time (pass `metrics=` to `save_compressed`, or see the run that made it)."
        )
    return "\n".join(lines) + "\n"
