"""Module names as the plain base model spells them, and PEFT-style pattern lookup on them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

__all__ = ["canonical_module_name", "lookup_pattern"]

def canonical_module_name(name: str) -> str:
    """Map a module name inside a PeftModel/NSN wrapper to the name it has in the plain base model."""
    for prefix in ("base_model.model.", "_orig_mod.", "module."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer", "")


def lookup_pattern(mapping: Mapping[str, Any], name: str) -> Optional[str]:
    """Key of ``mapping`` matching ``name`` exactly or as a pattern (PEFT's rank_pattern semantics)."""
    if name in mapping:
        return name
    for key in mapping:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None
