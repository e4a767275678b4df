"""The dense layers a plan covers: their modules and shapes, read from a model not yet adapted."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..calibrate.collect import calibration_targets
from ..tuner.layer import NSNLayer

__all__ = ["dense_weight", "layer_shapes"]


def layer_shapes(model: nn.Module, target_modules) -> dict[str, tuple[nn.Module, int, int]]:
    """``{name: (module, out_features m, in_features d)}`` of the plannable layers of a dense model."""
    layers = {}
    for name, module in calibration_targets(model, target_modules).items():
        if isinstance(module, NSNLayer):
            raise TypeError(
                f"Rank planning needs the dense model, but '{name}' is already an NSN layer; pass the base model "
                "(e.g. before get_peft_model, or peft_model.unload())."
            )
        weight = module.weight
        m, d = (weight.shape[1], weight.shape[0]) if isinstance(module, Conv1D) else tuple(weight.shape)
        layers[name] = (module, m, d)
    return layers


def dense_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.T if isinstance(module, Conv1D) else module.weight
