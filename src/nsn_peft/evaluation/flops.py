"""Ranks and FLOPs of a compressed export (fixed ranks: :class:`~nsn_peft.export.FactoredLinear` layers)."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["compressed_flops"]


def compressed_flops(model: nn.Module) -> dict[str, Any]:
    """``{"mean_rank", "min_rank", "max_rank", "targeted_flops_fraction", "model_flops_fraction",
    "flops_per_token"}`` of a compressed model, against the dense model it came from.

    Raises ``ValueError`` when the model has no factored layers.
    """
    from transformers.pytorch_utils import Conv1D

    from ..export.compressed import is_factored_linear
    from ..linalg.flops import dense_flops, factored_flops

    ranks, factored, dense_of_factored, other = [], 0, 0, 0
    # The factors are nn.Linear themselves: counted once, as their layer.
    inside = {
        id(sub)
        for module in model.modules()
        if is_factored_linear(module)
        for sub in module.modules()
        if sub is not module
    }
    for module in model.modules():
        if id(module) in inside:
            continue
        if is_factored_linear(module):
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
        "mean_rank": sum(ranks) / len(ranks),
        "min_rank": min(ranks),
        "max_rank": max(ranks),
        "targeted_flops_fraction": factored / dense_of_factored,
        "model_flops_fraction": (factored + other) / (dense_of_factored + other),
        "flops_per_token": factored + other,
    }
