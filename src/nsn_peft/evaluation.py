"""Perplexity of causal language models over text, with a sliding window."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import load_texts, token_stream

__all__ = ["evaluate_perplexity", "perplexity"]


def _stream(data: Any, tokenizer, max_tokens: Optional[int]) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        ids = data.reshape(-1)
    else:
        if tokenizer is None:
            raise ValueError("Text data needs a tokenizer: perplexity(model, texts, tokenizer=tok)")
        ids = token_stream(load_texts(data), tokenizer, max_tokens)
    return ids[:max_tokens] if max_tokens is not None else ids


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    seq_len: int = 512,
    stride: Optional[int] = None,
    max_tokens: Optional[int] = None,
    batch_size: int = 4,
    device: Optional[Union[str, torch.device]] = None,
    show_progress: bool = False,
) -> dict[str, float]:
    """Sliding-window perplexity: ``{"perplexity", "nll", "tokens"}``.

    ``data`` is anything :func:`nsn_peft.data.load_texts` accepts (texts, folder, file, ``datasets``
    Dataset or name) or a tensor of token ids. Windows of ``seq_len`` tokens advance by ``stride``
    (default ``seq_len``: disjoint windows); with ``stride < seq_len`` each window scores only its last
    ``stride`` tokens, so every token is predicted once with up to ``seq_len - stride`` tokens of context.
    """
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in (0, seq_len={seq_len}], got {stride}")
    ids = _stream(data, tokenizer, max_tokens)
    if ids.numel() < 2:
        raise ValueError("Need at least 2 tokens to compute perplexity")
    run_device = torch.device(device) if device is not None else next(model.parameters()).device
    windows = []  # (begin, end, number of scored tokens at the end of the window)
    prev_end = 0
    for begin in range(0, ids.numel() - 1, stride):
        end = min(begin + seq_len, ids.numel())
        # The first token of a window has no context inside it, so at most end-begin-1 tokens are scored.
        windows.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == ids.numel():
            break
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        groups = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
        for group in tqdm(groups, desc="Perplexity", unit="batch", disable=not show_progress):
            # Windows in a group share a length except possibly the last one of the text.
            for same in _by_length(group):
                batch = torch.stack([ids[b:e] for b, e, _ in same]).to(run_device)
                logits = model(input_ids=batch).logits[:, :-1].float()
                targets = batch[:, 1:]
                nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
                for row, (_, _, scored) in enumerate(same):
                    total_nll += nll[row, -scored:].sum().item()
                    total_tokens += scored
    finally:
        model.train(was_training)
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": float(total_tokens)}


def _by_length(windows):
    lengths: dict[int, list] = {}
    for window in windows:
        lengths.setdefault(window[1] - window[0], []).append(window)
    return lengths.values()


def perplexity(model: nn.Module, data: Any, **kwargs: Any) -> float:
    """Perplexity of ``model`` on ``data`` (see :func:`evaluate_perplexity` for the arguments)."""
    return evaluate_perplexity(model, data, **kwargs)["perplexity"]
