"""Module names as the plain base model spells them, and PEFT-style pattern lookup on them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

__all__ = ["canonical_module_name", "lookup_pattern", "strip_wrapper_names"]


def canonical_module_name(name: str) -> str:
    """Map a module name inside a PeftModel/NSN wrapper to the name it has in the plain base model."""
    for prefix in ("base_model.model.", "_orig_mod.", "module."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer", "")


# Pieces that module wrappers insert into names: activation checkpointing (FSDP's, Accelerate's), torch.compile,
# FSDP1. State dicts gathered from such a model use the plain names.
_WRAPPER_NAME_PIECES = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def strip_wrapper_names(name: str) -> str:
    """``name`` without the pieces wrappers insert (``layers.0._checkpoint_wrapped_module.mlp`` → ``layers.0.mlp``)."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_NAME_PIECES]
    return ".".join(parts)


def lookup_pattern(mapping: Mapping[str, Any], name: str) -> Optional[str]:
    """Key of ``mapping`` matching ``name`` exactly or as a pattern (PEFT's rank_pattern semantics)."""
    if name in mapping:
        return name
    for key in mapping:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None
