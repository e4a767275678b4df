"""Running an NSN model as the dense model it was made from: the base layers' own weights, adapters bypassed.

The factors replace each targeted weight, but the base layer keeps the original weight, so the untouched
dense model is always at hand as a teacher for distillation without a second copy in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .layer import NSNLayer

__all__ = ["check_dense_weights", "dense_model"]


def _layers(model: nn.Module) -> list[NSNLayer]:
    return [m for m in model.modules() if isinstance(m, NSNLayer)]


def check_dense_weights(model: nn.Module) -> None:
    """Raise ``ValueError`` unless every NSN layer still holds its dense base weight (needed by :func:`dense_model`)."""
    layers = _layers(model)
    if not layers:
        raise ValueError("The model has no NSN layers; wrap it with get_peft_model(model, NSNConfig(...)) first.")
    for layer in layers:
        weight = getattr(layer.get_base_layer(), "weight", None)
        if weight is None or weight.is_meta or weight.numel() == 0:
            raise ValueError(
                f"'{layer.module_name}' holds no dense base weight (it was dropped to save memory), so the dense model "
                "cannot serve as the teacher; load the adapter with the dense weights kept."
            )
        if layer.merged:
            raise ValueError(f"'{layer.module_name}' has its factors merged into the base weight; unmerge() it first.")


@contextlib.contextmanager
def dense_model(model: nn.Module, *, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes exactly what the dense model it was made from computes.

    Every NSN layer forwards through its base layer (the original weight); nothing is copied, no
    ``requires_grad`` flag changes, and the previous state comes back on exit. ``eval_mode`` also switches
    the model to evaluation mode (no dropout) inside the block.
    """
    layers = _layers(model)
    check_dense_weights(model)
    training = model.training
    previous = []
    try:
        for layer in layers:
            previous.append(layer.bypass_adapters(True))
        if eval_mode:
            model.eval()
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.bypass_adapters(flag)
        model.train(training)
