"""Registration with PEFT: the ``"nsn"`` method, and the two PEFT entry points NSN wraps.

Loading a saved adapter must not spend time decomposing weights that the checkpoint overwrites, so
``PeftModel.from_pretrained``/``load_adapter`` run inside a "loading a checkpoint" scope; ``save_pretrained``'s
model card gains the NSN section (ranks, FLOPs).
"""

from __future__ import annotations

import functools

from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from .config import NSNConfig
from .layer import NSNLayer
from .model import NSNModel
from .model_card import append_nsn_section
from .peft_type import checkpoint_load_scope, extend_peft_type, keep_base_weights_scope


def _make_rank_major(model) -> None:
    """After loading for serving (factors only; the checkpoint's tensors are released by now), store ``nsn_B``
    rank-major, layer by layer."""
    for module in model.modules():
        if isinstance(module, NSNLayer) and module.base_weight_dropped:
            module.make_rank_major()


def _patch_loading_entry_points() -> None:
    """Mark PEFT's adapter-loading entry points so NSN injection skips the decomposition there."""
    if getattr(PeftModel, "_nsn_patched", False):
        return
    original_from_pretrained = PeftModel.from_pretrained.__func__
    original_load_adapter = PeftModel.load_adapter

    # ``keep_base_weights=`` (NSN only) overrides the saved config: False loads for serving from factors only.
    @functools.wraps(original_from_pretrained)
    def from_pretrained(cls, *args, keep_base_weights=None, **kwargs):
        with checkpoint_load_scope(), keep_base_weights_scope(keep_base_weights):
            model = original_from_pretrained(cls, *args, **kwargs)
        _make_rank_major(model)
        return model

    @functools.wraps(original_load_adapter)
    def load_adapter(self, *args, keep_base_weights=None, **kwargs):
        with checkpoint_load_scope(), keep_base_weights_scope(keep_base_weights):
            result = original_load_adapter(self, *args, **kwargs)
        _make_rank_major(self)
        return result

    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter
    PeftModel._nsn_patched = True


def _patch_model_card() -> None:
    """Append the NSN section (ranks, FLOPs) to the README that ``save_pretrained`` writes."""
    if getattr(PeftModel.create_or_update_model_card, "_nsn_patched", False):
        return
    original = PeftModel.create_or_update_model_card

    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str):
        result = original(self, output_dir)
        config = self.peft_config.get(self.active_adapter) if isinstance(self.active_adapter, str) else None
        if config is not None and config.peft_type == PeftType.NSN:
            append_nsn_section(self, output_dir)
        return result

    create_or_update_model_card._nsn_patched = True
    PeftModel.create_or_update_model_card = create_or_update_model_card


def register() -> None:
    peft_type = extend_peft_type()
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name="nsn", config_cls=NSNConfig, model_cls=NSNModel, prefix="nsn_")
    _patch_loading_entry_points()
    _patch_model_card()
