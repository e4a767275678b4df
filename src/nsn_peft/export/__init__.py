"""Exports: compressed and nested models as transformers models that load without PEFT or nsn-peft
(``save_compressed``/``load_compressed``; the model class is :mod:`nsn_peft.export.modeling_nsn`)."""

from __future__ import annotations

from .compressed import (
    FactoredLinear,
    compressed_size,
    describe_export,
    is_compressed_model,
    is_export_folder,
    is_factored_linear,
    load_compressed,
    read_export_config,
    save_compressed,
)

__all__ = [
    "FactoredLinear",
    "compressed_size",
    "describe_export",
    "is_export_folder",
    "is_compressed_model",
    "is_factored_linear",
    "load_compressed",
    "read_export_config",
    "save_compressed",
]
