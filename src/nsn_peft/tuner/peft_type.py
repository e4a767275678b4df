"""``PeftType.NSN`` and the "loading a checkpoint" flag: the bottom of the tuner, imported by its config and model.

PEFT's ``PeftType`` is a closed ``str`` enum and ``register_peft_method`` refuses names that are not
members. Rather than vendoring PEFT or replacing the enum (which would break ``isinstance`` checks and
every existing member's identity), we add one member to the existing class, exactly as ``Enum`` stores
its own members. Everything else goes through PEFT's public registration function. The supported PEFT
range is pinned in ``pyproject.toml`` and the test-suite checks the registration end to end.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Optional

from peft.utils import PeftType

NSN_PEFT_TYPE_NAME = "NSN"

# True while PEFT is loading a saved adapter: the factors then come from the checkpoint, so injection must
# not spend time decomposing weights that are about to be overwritten.
_LOADING_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar("nsn_loading_checkpoint", default=False)
# The adapter file or folder being loaded, so that errors about its contents can name it.
_LOADING_SOURCE: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("nsn_loading_source", default=None)


def loading_checkpoint() -> bool:
    return _LOADING_CHECKPOINT.get()


def loading_source() -> Optional[str]:
    return _LOADING_SOURCE.get()


@contextlib.contextmanager
def checkpoint_load_scope(source: Optional[str] = None) -> Iterator[None]:
    token = _LOADING_CHECKPOINT.set(True)
    source_token = _LOADING_SOURCE.set(source)
    try:
        yield
    finally:
        _LOADING_SOURCE.reset(source_token)
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
