"""Small language-modelling data helpers for the multi-rank example and benchmark (private).

Plain-text folders -> fixed-length token blocks -> a ``Dataset`` the Trainer can consume, held-out
perplexity, and input Gram matrices for the whitened initialisation. Self-contained so the example and the
benchmark run offline with nothing but a tokenizer and a folder of ``.txt``/``.rst`` files.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".rst", ".md")

__all__ = ["TokenBlocks", "collect_input_grams", "perplexity", "read_texts", "token_blocks"]


def read_texts(paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], exclude: Iterable[str] = ()) -> list[str]:
    """Contents of every text file (``.txt``, ``.rst``, ``.md``, ``.rst.txt``) under ``paths``, in sorted order.

    ``exclude`` lists folder names skipped anywhere below (e.g. ``["howto"]`` to hold it out).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    skip = set(exclude)
    texts = []
    for root in paths:
        root = Path(root)
        if root.is_file():
            files = [root]
        elif root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
            files = [p for p in files if not skip.intersection(p.relative_to(root).parts[:-1])]
        else:
            raise FileNotFoundError(f"Text data not found: {root}")
        for path in files:
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    if not texts:
        raise ValueError(f"No text files ({', '.join(TEXT_SUFFIXES)}) under {[str(p) for p in paths]}")
    return texts


def token_blocks(texts: Sequence[str], tokenizer, block_size: int, max_tokens: Optional[int] = None) -> torch.Tensor:
    """Concatenate the tokenised texts (EOS between documents) and cut them into ``(n, block_size)`` blocks."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    limit = None if max_tokens is None else max(max_tokens, block_size)
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if limit is not None and len(ids) >= limit:
            break
    if limit is not None:
        ids = ids[:limit]
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"Only {len(ids)} tokens of text: not one block of {block_size}")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


class TokenBlocks(torch.utils.data.Dataset):
    """Causal-LM examples ``{"input_ids", "labels"}`` (labels = inputs; the model shifts them)."""

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


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, autocast_dtype: Optional[torch.dtype] = None) -> float:
    """Token-level perplexity ``exp(Σ NLL / #predicted tokens)`` of a causal LM on ``blocks``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else torch.autocast(device.type, enabled=False)
    )
    try:
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)
            with autocast:
                logits = model(input_ids=batch).logits
            nll = nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += nll.item()
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / max(count, 1))


@torch.no_grad()
def collect_input_grams(
    model: nn.Module, blocks: torch.Tensor, module_suffixes: Sequence[str], batch_size: int = 8, desc: str = "calibration"
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``Σ xxᵀ`` (float64) of the inputs of every ``nn.Linear`` whose name ends with one of ``module_suffixes``."""
    device = next(model.parameters()).device
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return fn

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in module_suffixes:
            hooks.append(module.register_forward_hook(hook(name)))
    if not hooks:
        raise ValueError(f"No nn.Linear module named like {list(module_suffixes)}")
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, blocks.shape[0], batch_size), desc=desc, unit="batch"):
            model(input_ids=blocks[start : start + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: v.cpu() for k, v in grams.items()}, counts
