"""Language-modelling data for ``Trainer``: text folders with held-out subfolders, fixed-length token blocks.

Reading several text folders with some subfolders held out, and the ``Dataset`` of fixed-length token blocks
that ``Trainer`` consumes. Tokenisation, perplexity and calibration come from :mod:`nsn_peft.data`,
:mod:`nsn_peft.evaluation` and :mod:`nsn_peft.calibration`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Union

import torch

from ..data import load_texts

__all__ = ["TokenBlocks", "read_texts"]


def read_texts(
    paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], exclude: Iterable[str] = ()
) -> list[str]:
    """Documents of every folder/file in ``paths`` (:func:`nsn_peft.data.load_texts`), skipping any subfolder
    whose name is in ``exclude`` (e.g. ``["howto"]`` to hold it out)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    skip = set(exclude)
    texts: list[str] = []
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"Text data not found: {root}")
        if root.is_dir() and skip:
            for child in sorted(root.iterdir()):
                if child.is_dir() and child.name in skip:
                    continue
                if child.is_dir():
                    texts.extend(read_texts(child, skip) if any(p.is_dir() for p in child.iterdir()) else _maybe(child))
                elif child.name.endswith((".txt", ".rst", ".md")):
                    texts.extend(_maybe(child))
        else:
            texts.extend(load_texts(root))
    if not texts:
        raise ValueError(f"No text under {[str(p) for p in paths]} (excluding {sorted(skip)})")
    return texts


def _maybe(path: Path) -> list[str]:
    try:
        return load_texts(path)
    except ValueError:  # a folder without text files, or an empty file
        return []


class TokenBlocks(torch.utils.data.Dataset):
    """Causal-LM examples ``{"input_ids", "labels"}`` from ``(n, block_size)`` token blocks (labels = inputs;
    the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.dim() != 2:
            raise ValueError(f"blocks must be (n, block_size), got shape {tuple(blocks.shape)}")
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()
