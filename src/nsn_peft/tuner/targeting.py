"""Which modules an NSN adapter targets, asked of the one matcher calibration, planning and the CLI use too
(:class:`~nsn_peft.layer_selection.LayerSelection`), plus the ``layers_to_transform`` range check and the
module types NSN can factor.

PEFT expands ``target_modules="all-linear"`` (NSN's default) into the *full names* of the linear layers and
matches a full name before it looks at ``layers_to_transform``, so the layer filter was silently ignored on
models too small for PEFT's later suffix compaction. The tuner selects its modules from the options as the user
gave them, before that expansion (:func:`selection_for`), and answers PEFT's per-module question from it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import _ExcludedModule
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..layer_selection import EXCLUDED, LayerSelection, is_linear
from ..naming import canonical_module_name
from .layer import NSNLayer


def is_all_linear(target_modules: Any) -> bool:
    return target_modules is None or (
        isinstance(target_modules, str) and target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND
    )


class Selection:
    """The modules one injection adapts: chosen once from the options as given, then asked per module by PEFT."""

    def __init__(self, model: nn.Module, config: Any) -> None:
        self.options = LayerSelection.of(config)
        chosen = self.options.select(model)
        # The keys PEFT will ask about, as the model spells them (wrapper prefixes included).
        self.keys = {key for key, module in model.named_modules() if chosen.get(canonical_module_name(key)) is module}

    def answer(self, key: str) -> Union[bool, _ExcludedModule]:
        """PEFT's ``_check_target_module_exists`` answer for the module ``key`` of the base model."""
        if key in self.keys:
            return True
        return _ExcludedModule() if self.options.match(key) == EXCLUDED else False


def check_target_module_exists(config: Any, key: str, selection: Optional[Selection] = None):
    """Whether the module ``key`` is adapted: from ``selection`` during an injection, else from ``config``'s
    options as they stand (after injection, PEFT's expanded names)."""
    if selection is not None:
        return selection.answer(key)
    match = LayerSelection.of(config).match(key)
    return True if match == "selected" else _ExcludedModule() if match == EXCLUDED else False


def record_adapted_modules(model: nn.Module, config: Any, adapter_name: str, selection: Selection) -> None:
    """After an ``"all-linear"`` injection filtered by ``layers_to_transform``, make ``target_modules`` the adapted
    names (PEFT saved all linear layers' names, which a load would match whatever their block)."""
    if selection.options.all_linear and selection.options.layers_to_transform is not None:
        config.target_modules = {
            n for n, m in model.named_modules() if isinstance(m, NSNLayer) and adapter_name in m.nsn_A
        }


def check_layers_to_transform(model: nn.Module, config: Any) -> None:
    """Raise a ``ValueError`` naming ``layers_to_transform`` (and the valid range) when it asks for layers the
    targeted modules do not have, or ``layers_pattern`` when it names no numbered block."""
    options = LayerSelection.of(config)
    wanted = options.layers_to_transform
    if wanted is None:
        return
    wanted = [wanted] if isinstance(wanted, int) else list(wanted)
    unfiltered = dataclasses.replace(options, layers_to_transform=None, layers_pattern=None, exclude_modules=None)
    present: set[int] = set()
    containers: set[str] = set()
    for name, module in unfiltered.select(model).items():
        if not is_linear(module):
            continue
        container = re.match(r"(?:^|.*?\.)([^.]+)\.\d+\.", name)
        if container:
            containers.add(container.group(1))
        index = options.layer_index(name)
        if index is not None:
            present.add(index)
    if not present:
        if options.layers_pattern and containers:
            raise ValueError(
                f"NSNConfig.layers_pattern={config.layers_pattern!r} names no numbered block of {type(model).__name__}; "
                f"its targeted modules sit in {sorted(containers)}."
            )
        return  # no numbered layers among the targets: the target_modules error says more
    missing = sorted(set(wanted) - present)
    if missing:
        where = f" (layers_pattern={config.layers_pattern!r})" if config.layers_pattern else ""
        raise ValueError(
            f"NSNConfig.layers_to_transform={config.layers_to_transform!r}: {type(model).__name__} has no layer "
            f"{', '.join(map(str, missing))}{where}; its targeted layers are numbered {min(present)}-{max(present)}."
        )


def _is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__module__.split(".")[0] in {"bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "torchao"}
        or hasattr(module, "qweight")
        or (weight is not None and not torch.is_floating_point(weight))
        or (weight is not None and type(weight).__name__ in {"Params4bit", "Int8Params"})
    )


def check_supported_module(module: nn.Module, name: str) -> None:
    """Raise a ``TypeError`` naming ``name`` unless ``module`` is a dense linear layer NSN can factor."""
    if isinstance(module, NSNLayer):
        return
    kind = type(module).__name__
    if _is_quantized(module):
        raise TypeError(
            f"NSN cannot adapt '{name}' ({kind}): quantized layers are not supported; "
            "load the model in fp32/bf16/fp16 (dequantized) before adapting it."
        )
    if isinstance(module, (nn.Linear, Conv1D)):
        return
    if isinstance(module, nn.Embedding):
        reason = "embeddings are lookups, not matrix products, and are not factored"
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        reason = (
            f"convolutions (kernel size {tuple(module.kernel_size)}) are not supported; only nn.Linear and Conv1D are"
        )
    else:
        reason = "only nn.Linear and transformers' Conv1D layers are supported"
    raise TypeError(f"NSN cannot adapt '{name}' ({kind}): {reason}.")
