"""Per-model runtime options of NSN layers: the Triton kernels on or off, and ``nsn_B``'s storage layout.

Options belong to one model. ``set_runtime_options(model, kernels=True)`` changes that model's layers only (two
models in one process may run differently), and the tuner keeps them, so layers it creates later (another
adapter) run the same way. :class:`~nsn_peft.tuner.layer.RuntimeOptions` says what each option does.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from torch import nn

from .layer import NSNLayer, RuntimeOptions
from .ranks import _tuner

__all__ = ["RuntimeOptions", "apply_runtime_options", "get_runtime_options", "set_runtime_options"]


def get_runtime_options(model: nn.Module) -> RuntimeOptions:
    """The options ``model`` runs with (its tuner's; for a plain module, those of its first NSN layer)."""
    tuner = _tuner(model)
    if tuner is not None:
        return tuner.runtime_options
    first = next((m for m in model.modules() if isinstance(m, NSNLayer)), None)
    return first.runtime_options if first is not None else RuntimeOptions()


def set_runtime_options(
    model: nn.Module,
    options: Optional[RuntimeOptions] = None,
    *,
    kernels: Optional[bool] = None,
    rank_major: Optional[bool] = None,
) -> RuntimeOptions:
    """Run ``model``'s NSN layers with ``options``, or with the current options changed where a keyword is given.

    ``set_runtime_options(model, kernels=True)``: the Triton decode kernel on this model only;
    ``rank_major=True``: ``nsn_B`` column-major for serving and compiled rank switching (``compile_for_ranks``
    does this), ``False``: contiguous factors for training. Returns the options now in force.
    """
    tuner = _tuner(model)
    if tuner is not None:
        return tuner.set_runtime_options(options, kernels=kernels, rank_major=rank_major)
    resolved = _resolved(get_runtime_options(model), options, kernels, rank_major)
    apply_runtime_options(model, resolved)
    return resolved


def _resolved(
    current: RuntimeOptions, options: Optional[RuntimeOptions], kernels: Optional[bool], rank_major: Optional[bool]
) -> RuntimeOptions:
    changes = {k: v for k, v in (("kernels", kernels), ("rank_major", rank_major)) if v is not None}
    return dataclasses.replace(options if options is not None else current, **changes)


def apply_runtime_options(model: nn.Module, options: RuntimeOptions) -> int:
    """Give every NSN layer of ``model`` ``options`` (layer by layer); returns how many factors were re-laid out."""
    return sum(m.set_runtime_options(options) for m in model.modules() if isinstance(m, NSNLayer))
