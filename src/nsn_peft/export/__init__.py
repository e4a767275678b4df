"""Exports: a rank-fixed, factored checkpoint that loads without PEFT (``save_compressed``/``load_compressed``)."""

from __future__ import annotations

from .compressed import FactoredLinear, compressed_size, load_compressed, save_compressed

__all__ = ["FactoredLinear", "compressed_size", "load_compressed", "save_compressed"]
