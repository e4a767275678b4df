"""The few places where an out-of-tree method has to reach into PEFT.

PEFT's ``PeftType`` is a closed ``str`` enum and ``register_peft_method`` refuses names that are not
members. Rather than vendoring PEFT or replacing the enum (which would break ``isinstance`` checks and
every existing member's identity), we add one member to the existing class, exactly as ``Enum`` stores
its own members. Everything else goes through PEFT's public registration function. The supported PEFT
range is pinned in ``pyproject.toml`` and the test-suite checks the registration end to end.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

from peft import PeftModel
from peft.utils import PeftType

NSN_PEFT_TYPE_NAME = "NSN"

# True while PEFT is loading a saved adapter: the factors then come from the checkpoint, so injection must
# not spend time decomposing weights that are about to be overwritten.
_LOADING_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar("nsn_loading_checkpoint", default=False)


def loading_checkpoint() -> bool:
    return _LOADING_CHECKPOINT.get()


@contextlib.contextmanager
def _checkpoint_load_scope() -> Iterator[None]:
    token = _LOADING_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _LOADING_CHECKPOINT.reset(token)


def extend_peft_type() -> PeftType:
    """Add ``PeftType.NSN`` to PEFT's enum (idempotent) and return it."""
    existing = PeftType.__members__.get(NSN_PEFT_TYPE_NAME)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, NSN_PEFT_TYPE_NAME)
    member._name_ = NSN_PEFT_TYPE_NAME
    member._value_ = NSN_PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    # type.__setattr__ bypasses EnumType.__setattr__, which forbids assigning members after class creation.
    type.__setattr__(PeftType, NSN_PEFT_TYPE_NAME, member)
    PeftType._member_map_[NSN_PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[NSN_PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(NSN_PEFT_TYPE_NAME)
    return member


def _patch_loading_entry_points() -> None:
    """Mark PEFT's adapter-loading entry points so NSN injection skips the decomposition there."""
    if getattr(PeftModel, "_nsn_patched", False):
        return
    original_from_pretrained = PeftModel.from_pretrained.__func__
    original_load_adapter = PeftModel.load_adapter

    @functools.wraps(original_from_pretrained)
    def from_pretrained(cls, *args, **kwargs):
        with _checkpoint_load_scope():
            return original_from_pretrained(cls, *args, **kwargs)

    @functools.wraps(original_load_adapter)
    def load_adapter(self, *args, **kwargs):
        with _checkpoint_load_scope():
            return original_load_adapter(self, *args, **kwargs)

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
            from .model_card import append_nsn_section

            append_nsn_section(self, output_dir)
        return result

    create_or_update_model_card._nsn_patched = True
    PeftModel.create_or_update_model_card = create_or_update_model_card


def register() -> None:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import NSNConfig
    from .model import NSNModel

    peft_type = extend_peft_type()
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name="nsn", config_cls=NSNConfig, model_cls=NSNModel, prefix="nsn_")
    _patch_loading_entry_points()
    _patch_model_card()
