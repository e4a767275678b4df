"""Calibration: accumulate the input Gram ``XᵀX`` of every targeted linear layer with forward hooks.

Memory is one d×d matrix per layer, never the activations. Layers that read the *same* input tensor
(q/k/v, gate/up) share one Gram product per batch, which keeps the overhead over a plain forward small.
Per-batch products run in float32 on the model's device (tensor cores, and a batch of a few thousand
tokens loses nothing); the running sums are float64, because summing millions of outer products of
activations with outlier features (~1e3) in float32 drops exactly the small directions whitening needs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .data import token_blocks
from .layer import NSNLayer
from .stats import ActivationStats, canonical_module_name

logger = logging.getLogger(__name__)

__all__ = ["collect_activation_stats", "calibration_targets"]


def _matches(name: str, target_modules: Union[None, str, Sequence[str]]) -> bool:
    if target_modules is None or target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def calibration_targets(model: nn.Module, target_modules: Union[None, str, Sequence[str]] = None) -> dict[str, nn.Module]:
    """``{canonical name: module}`` whose inputs are recorded: linear/Conv1D layers (NSN layers count as
    their base layer), except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets: dict[str, nn.Module] = {}
    inside_nsn: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside_nsn or module is head:
            continue
        if isinstance(module, NSNLayer):
            inside_nsn.update(id(m) for m in module.modules() if m is not module)
        elif not isinstance(module, (nn.Linear, Conv1D)):
            continue
        canonical = canonical_module_name(name)
        if canonical.endswith("lm_head") and target_modules in (None, "all-linear"):
            continue
        if _matches(canonical, target_modules):
            targets[canonical] = module
    if not targets:
        raise ValueError(f"No linear layer of {type(model).__name__} matches target_modules={target_modules!r}")
    return targets


def _batches(data: Any, tokenizer, max_tokens: Optional[int], seq_len: int, batch_size: int) -> Iterable[dict]:
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], str):
        if tokenizer is None:
            raise ValueError("Texts need a tokenizer: collect_activation_stats(model, texts, tokenizer=tok)")
        data = token_blocks(data, tokenizer, seq_len, max_tokens)
    if isinstance(data, torch.Tensor):
        blocks = data if data.dim() == 2 else data[: data.numel() // seq_len * seq_len].view(-1, seq_len)
        for start in range(0, blocks.shape[0], batch_size):
            yield {"input_ids": blocks[start : start + batch_size]}
        return
    for batch in data:
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TypeError(f"Calibration batches must be dicts with 'input_ids' (and 'attention_mask'), got {type(batch).__name__}")
        yield batch


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    max_tokens: Optional[int] = 65536,
    seq_len: int = 512,
    batch_size: int = 8,
    target_modules: Union[None, str, Sequence[str]] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float64,
    stats_device: Optional[Union[str, torch.device]] = "cpu",
    show_progress: bool = True,
) -> ActivationStats:
    """Run ``model`` over calibration data and return the input Gram matrix of every targeted layer.

    Args:
        data: a list of texts (with ``tokenizer``), a tensor of token ids (``(n, seq_len)`` blocks or a 1-D
            stream), or an iterable/DataLoader of dicts with ``input_ids`` and optional ``attention_mask``
            (padded positions are excluded from the statistics).
        max_tokens: stop after this many (non-padding) tokens; ``None`` = all.
        target_modules: layer names (suffix match) or a regex; default every linear layer but the head.
        device: where to run; default the model's device.
        dtype: accumulator dtype (float64 recommended, see the module docstring).
        stats_device: where the returned matrices live (``"cpu"``; ``None`` keeps them on the run device,
            which avoids a device-to-host copy when they are used right away).

    Under ``torch.distributed`` the sums are all-reduced, so every process returns the global statistics.
    """
    targets = calibration_targets(model, target_modules)
    param = next(model.parameters())
    run_device = torch.device(device) if device is not None else param.device
    if device is not None and param.device != run_device:
        model.to(run_device)
    grams = {name: torch.zeros(m.in_features if isinstance(m, (nn.Linear, NSNLayer)) else m.weight.shape[0],
                               m.in_features if isinstance(m, (nn.Linear, NSNLayer)) else m.weight.shape[0],
                               dtype=dtype, device=run_device) for name, m in targets.items()}
    counts = dict.fromkeys(targets, 0)
    # Layers reading the same input (q/k/v, gate/up) are called one after another with the *same tensor
    # object*: remember the last input (holding a reference, so its memory cannot be reused by another
    # tensor meanwhile) and compute its Gram once.
    state: dict[str, Any] = {"mask": None, "last": None}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            last = state["last"]
            if last is None or last[0] is not x:
                flat = x.reshape(-1, x.shape[-1])
                mask = state["mask"]
                if mask is not None and mask.numel() == flat.shape[0]:
                    flat = flat[mask]
                flat = flat.float()
                last = (x, (flat.T @ flat).to(dtype), flat.shape[0])
                state["last"] = last
            grams[name] += last[1]
            counts[name] += last[2]

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in targets.items()]
    was_training = model.training
    model.eval()
    seen = 0
    progress = tqdm(total=max_tokens, desc="Calibrating", unit="tok", disable=not show_progress)
    try:
        for batch in _batches(data, tokenizer, max_tokens, seq_len, batch_size):
            ids = batch["input_ids"].to(run_device)
            mask = batch.get("attention_mask")
            mask = mask.to(run_device) if mask is not None else None
            state["mask"] = mask.reshape(-1).bool() if mask is not None else None
            model(input_ids=ids, attention_mask=mask)
            state["last"] = None
            n = int(mask.sum()) if mask is not None else ids.numel()
            seen += n
            progress.update(n)
            if max_tokens is not None and seen >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
        state["last"] = None
        progress.close()
        model.train(was_training)
    if seen == 0:
        raise ValueError("Calibration data produced no tokens")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for gram in grams.values():
            torch.distributed.all_reduce(gram)
        count_tensor = torch.tensor([counts[n] for n in targets], dtype=torch.long, device=run_device)
        torch.distributed.all_reduce(count_tensor)
        counts = {n: int(c) for n, c in zip(targets, count_tensor.tolist())}
    config = getattr(model, "config", None)
    model_id = getattr(config, "_name_or_path", None) or getattr(config, "model_type", None)
    logger.info("Collected activation statistics of %d layers over %d tokens", len(grams), seen)
    out_device = torch.device(stats_device) if stats_device is not None else run_device
    return ActivationStats({n: g.to(out_device) for n, g in grams.items()}, counts, model_id or None, {"seq_len": seq_len})
