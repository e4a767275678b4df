"""Which modules an NSN adapter targets: ``layers_to_transform`` with ``"all-linear"``, and its range check.

PEFT expands ``target_modules="all-linear"`` (NSN's default) into the *full names* of the linear layers, and
matches a full name before it looks at ``layers_to_transform`` — so on models too small for PEFT's later
suffix compaction the layer filter was silently ignored. The tuner asks these functions instead.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from peft.tuners.tuners_utils import _ExcludedModule
from peft.tuners.tuners_utils import check_target_module_exists as _peft_check
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn
from transformers.pytorch_utils import Conv1D

from .layer import NSNLayer

_FILTER_FLAG = "_nsn_filter_layers"  # set on a config whose "all-linear" targets must still honour layers_to_transform


def is_all_linear(target_modules: Any) -> bool:
    return target_modules is None or (isinstance(target_modules, str) and target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND)


def remember_layer_filter(config: Any, all_linear: bool) -> None:
    setattr(config, _FILTER_FLAG, all_linear and config.layers_to_transform is not None)


def check_target_module_exists(config: Any, key: str):
    """PEFT's matcher, plus the ``layers_to_transform`` filter for expanded ``"all-linear"`` targets."""
    result = _peft_check(config, key)
    if result and not isinstance(result, _ExcludedModule) and getattr(config, _FILTER_FLAG, False):
        if "." not in key:
            return False  # a top-level module belongs to no numbered layer
        narrowed = copy.copy(config)
        narrowed.target_modules = {key.rsplit(".", 1)[1]}  # a suffix: PEFT then applies the layer filter
        return _peft_check(narrowed, key)
    return result


def record_adapted_modules(model: nn.Module, config: Any, adapter_name: str) -> None:
    """After injection with the filter, make ``target_modules`` the adapted names, so the saved config recreates
    exactly them on load."""
    if getattr(config, _FILTER_FLAG, False):
        config.target_modules = {n for n, m in model.named_modules() if isinstance(m, NSNLayer) and adapter_name in m.nsn_A}
        setattr(config, _FILTER_FLAG, False)


def check_layers_to_transform(model: nn.Module, config: Any) -> None:
    """Raise a ``ValueError`` naming ``layers_to_transform`` (and the valid range) when it asks for layers the
    targeted modules do not have, or ``layers_pattern`` when it names no numbered block."""
    wanted = config.layers_to_transform
    if wanted is None:
        return
    wanted = [wanted] if isinstance(wanted, int) else list(wanted)
    patterns = config.layers_pattern
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
    # The regexes PEFT uses to read a module's layer index.
    regexes = [rf"(?:^|.*?\.){re.escape(p)}\.(\d+)\." for p in patterns] or [r".*?\.[^.]*\.(\d+)\."]
    unfiltered = copy.copy(config)
    unfiltered.layers_to_transform, unfiltered.layers_pattern = None, None
    all_linear = is_all_linear(config.target_modules)
    present: set[int] = set()
    containers: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D, NSNLayer)):
            continue
        if not all_linear and not _peft_check(unfiltered, name):
            continue
        container = re.match(r"(?:^|.*?\.)([^.]+)\.\d+\.", name)
        if container:
            containers.add(container.group(1))
        for regex in regexes:
            match = re.match(regex, name)
            if match:
                present.add(int(match.group(1)))
                break
    if not present:
        if patterns and containers:
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
