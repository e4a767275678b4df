"""Which layers an NSN adapter's options select: the one matcher the tuner, calibration, planning and the CLI share.

``target_modules``, ``exclude_modules``, ``layers_to_transform`` and ``layers_pattern`` keep PEFT's meaning, so
a saved adapter config selects the same modules as before: a string is a regex that must match the whole module
name, a list holds names or name suffixes, the default (``None`` or ``"all-linear"``) takes every linear /
``Conv1D`` layer but the output head. ``layers_to_transform`` keeps the modules of those numbered blocks; as
in PEFT it does not narrow a regex, nor a module listed by its full name. Unlike PEFT's ``"all-linear"``
expansion (which lists full names and so escaped the block filter), the default target honours it.

Calibration collects statistics of exactly the layers an adapter with the same options adapts, so
``calibrate`` then ``adapt`` can never disagree about the layer set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional, Union

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import SEQ_CLS_HEAD_NAMES
from torch import nn
from transformers.pytorch_utils import Conv1D

from .naming import canonical_module_name

__all__ = ["SELECTED", "EXCLUDED", "UNMATCHED", "LayerSelection", "is_linear", "select_layers", "unmatched_targets"]

ALL_LINEAR = "all-linear"
SELECTED, EXCLUDED, UNMATCHED = "selected", "excluded", "unmatched"

Names = Union[None, str, Iterable[str]]


def _names(value: Names) -> Union[None, str, frozenset[str]]:
    if value is None or isinstance(value, str):
        return value
    return frozenset(str(v) for v in value)


def is_linear(module: nn.Module) -> bool:
    """A dense layer NSN can factor: ``nn.Linear``, transformers' ``Conv1D``, or a PEFT layer wrapping one."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return isinstance(module, (nn.Linear, Conv1D))


@dataclass(frozen=True)
class LayerSelection:
    """The layer options of an NSN adapter (or of calibration and planning, which must select the same layers)."""

    target_modules: Union[None, str, frozenset[str]] = None
    exclude_modules: Union[None, str, frozenset[str]] = None
    layers_to_transform: Union[None, int, tuple[int, ...]] = None
    layers_pattern: Union[None, str, tuple[str, ...]] = None
    modules_to_save: tuple[str, ...] = ()
    task_type: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", _names(self.target_modules))
        object.__setattr__(self, "exclude_modules", _names(self.exclude_modules))
        layers = self.layers_to_transform
        if layers is not None and not isinstance(layers, int):
            object.__setattr__(self, "layers_to_transform", tuple(int(i) for i in layers))
        pattern = self.layers_pattern
        if pattern is not None and not isinstance(pattern, str):
            object.__setattr__(self, "layers_pattern", tuple(pattern))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))

    @classmethod
    def of(cls, options: Any) -> LayerSelection:
        """The selection of an :class:`~nsn_peft.NSNConfig` (or anything with its layer fields), of a
        ``target_modules`` value alone (``None``, a regex, a list of names), or itself."""
        if isinstance(options, LayerSelection):
            return options
        if options is None or isinstance(options, (str, list, tuple, set, frozenset)):
            return cls(target_modules=options)
        return cls(
            target_modules=getattr(options, "target_modules", None),
            exclude_modules=getattr(options, "exclude_modules", None),
            layers_to_transform=getattr(options, "layers_to_transform", None),
            layers_pattern=getattr(options, "layers_pattern", None),
            modules_to_save=getattr(options, "modules_to_save", None) or (),
            task_type=getattr(options, "task_type", None),
        )

    @property
    def all_linear(self) -> bool:
        target = self.target_modules
        return target is None or (isinstance(target, str) and target.lower() == ALL_LINEAR)

    # -- names ------------------------------------------------------------------------------------------
    def layer_index(self, name: str) -> Optional[int]:
        """The number of the block holding ``name`` (PEFT's rule: the first numbered segment, or the one after
        ``layers_pattern``), else ``None``."""
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else list(self.layers_pattern or ())
        regexes = [rf"(?:^|.*?\.){p}\.(\d+)\." for p in patterns] or [r".*?\.[^.]*\.(\d+)\."]
        for regex in regexes:
            match = re.match(regex, name)
            if match:
                return int(match.group(1))
        return None

    def _in_layers(self, name: str) -> bool:
        wanted = self.layers_to_transform
        if wanted is None or wanted == ():
            return True
        index = self.layer_index(name)
        if index is None:
            return False
        return index == wanted if isinstance(wanted, int) else index in wanted

    def match(self, name: str) -> str:
        """:data:`SELECTED`, :data:`EXCLUDED` (by ``exclude_modules`` or ``modules_to_save``) or :data:`UNMATCHED`
        for the module ``name`` (as the plain base model spells it). With the default target every name matches
        here; :meth:`select` keeps the linear layers but the head."""
        exclude = self.exclude_modules
        if exclude:
            if isinstance(exclude, str):
                if re.fullmatch(exclude, name):
                    return EXCLUDED
            elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
                return EXCLUDED
        if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in self.modules_to_save):
            return EXCLUDED
        target = self.target_modules
        if self.all_linear:
            found = self._in_layers(name)
        elif isinstance(target, str):
            found = re.fullmatch(target, name) is not None  # a regex: layers_to_transform does not apply
        elif name in target:
            found = True  # a full name: listed on purpose, whatever its block
        else:
            found = any(name.endswith(f".{t}") for t in target) and self._in_layers(name)
        return SELECTED if found else UNMATCHED

    def selects(self, name: str) -> bool:
        return self.match(name) == SELECTED

    # -- a model --------------------------------------------------------------------------------------------
    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """``{module name: module}`` of the modules of ``model`` these options select.

        Names are those of the plain base model (PEFT/NSN wrappers stripped); a PEFT layer counts as the layer
        it wraps (its inner modules are never candidates). The default target takes only linear / ``Conv1D``
        layers and leaves out the output head; an explicit target may select any module, so that callers can
        name one they cannot handle (see :func:`is_linear`).
        """
        heads = _heads(model, self.task_type)
        selected: dict[str, nn.Module] = {}
        inside: set[int] = set()
        for raw, module in model.named_modules():
            if not raw or id(module) in inside:
                continue
            if isinstance(module, BaseTunerLayer):
                inside.update(id(m) for m in module.modules() if m is not module)
            name = canonical_module_name(raw)
            if self.all_linear and (id(module) in heads or not is_linear(module) or name.endswith("lm_head")):
                continue
            if not name or name in selected:
                continue
            if self.selects(name):
                selected[name] = module
        return selected


def select_layers(model: nn.Module, options: Any = None) -> dict[str, nn.Module]:
    """``LayerSelection.of(options).select(model)``: the modules an adapter with ``options`` (an NSNConfig, a
    :class:`LayerSelection` or a ``target_modules`` value) adapts."""
    return LayerSelection.of(options).select(model)


def _heads(model: nn.Module, task_type: Optional[str]) -> set[int]:
    """The output layers the default target leaves out, as PEFT's ``"all-linear"`` does: the output embeddings, or
    for sequence classification the classifier head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return {id(head)}
    if task_type == "SEQ_CLS":
        for name in SEQ_CLS_HEAD_NAMES:
            if getattr(model, name, None) is not None:
                return {id(getattr(model, name))}
    return set()


def unmatched_targets(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The entries of a ``target_modules``/``exclude_modules`` list that match no linear layer of ``model``."""
    linear = [n for n, m in LayerSelection(target_modules=".*").select(model).items() if is_linear(m)]
    return [t for t in names if not any(LayerSelection(target_modules=(t,)).selects(n) for n in linear)]
