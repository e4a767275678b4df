"""Perplexity of causal language models over text, with a sliding window, under one of two protocols.

* ``"nsn"`` (default): documents are tokenised and concatenated into one stream with EOS between them
  (:func:`nsn_peft.data.token_stream`); windows of ``seq_len`` (default 512) tokens advance by ``stride``; a
  last partial window is scored too.
* ``"standard"``: the protocol of GPTQ, SparseGPT, SVD-LLM and most compression papers (WikiText-2 perplexity):
  documents joined with ``"\n\n"`` into one text tokenised once (no EOS), disjoint windows of 2048 tokens, the
  last partial window dropped. Numbers under it compare with published tables when the text is the same.

With ``stride < seq_len`` a window scores only the tokens no earlier window scored, so every token after the
first is predicted exactly once, with at least ``seq_len - stride`` tokens of context (except at the start).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import load_texts, token_stream
from ..devices import resolve_device
from ..vocab import check_token_ids

logger = logging.getLogger(__name__)

__all__ = ["PERPLEXITY_PROTOCOLS", "evaluate_perplexity", "perplexity", "sliding_windows"]

# protocol -> its default window length, how documents are joined, what happens to a last partial window
PERPLEXITY_PROTOCOLS: dict[str, dict[str, Any]] = {
    "nsn": {"seq_len": 512, "join": "EOS between documents", "partial_window": "scored"},
    "standard": {"seq_len": 2048, "join": "documents joined with \\n\\n, no EOS", "partial_window": "dropped"},
}


def _stream(data: Any, tokenizer: Any, max_tokens: Optional[int], protocol: str = "nsn") -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.is_floating_point() or data.is_complex():
            raise TypeError(f"A token tensor must hold integer ids, got dtype {data.dtype}")
        ids = data.reshape(-1).long()
    else:
        if tokenizer is None:
            raise ValueError("Text data needs a tokenizer: perplexity(model, texts, tokenizer=tok)")
        if protocol == "standard":
            # One text, tokenised once: the tokenizer's own special tokens (e.g. a leading BOS) as it adds them.
            ids = torch.tensor(tokenizer("\n\n".join(load_texts(data)))["input_ids"], dtype=torch.long)
        else:
            ids = token_stream(load_texts(data), tokenizer, max_tokens)
    return ids[:max_tokens] if max_tokens is not None else ids


def _check_protocol(protocol: str) -> dict[str, Any]:
    if protocol not in PERPLEXITY_PROTOCOLS:
        raise ValueError(f"unknown perplexity protocol {protocol!r}; choose one of {sorted(PERPLEXITY_PROTOCOLS)}")
    return PERPLEXITY_PROTOCOLS[protocol]


def sliding_windows(num_tokens: int, seq_len: int, stride: Optional[int] = None) -> list[tuple[int, int, int]]:
    """``(begin, end, scored)`` windows over a stream: ``scored`` is how many of the window's last tokens count.

    The first token of a window has no context inside it, so at most ``end - begin - 1`` tokens are scored;
    with ``stride < seq_len`` only the tokens past the previous window's end are scored.
    """
    stride = stride or seq_len
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in (0, seq_len={seq_len}], got {stride}")
    windows = []
    prev_end = 0
    for begin in range(0, max(num_tokens - 1, 0), stride):
        end = min(begin + seq_len, num_tokens)
        scored = min(end - prev_end, end - begin - 1)
        if scored > 0:
            windows.append((begin, end, scored))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def _supports_logits_to_keep(model: nn.Module) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    seq_len: Optional[int] = None,
    stride: Optional[int] = None,
    max_tokens: Optional[int] = None,
    batch_size: int = 4,
    device: Optional[Union[str, torch.device]] = None,
    show_progress: bool = False,
    protocol: str = "nsn",
) -> dict[str, Any]:
    """Sliding-window perplexity with details.

    Args:
        model: a causal LM (transformers model, ``PeftModel``, or a compressed model).
        data: anything :func:`nsn_peft.data.load_texts` accepts (texts, folder, file, ``datasets``
            Dataset or dataset name), or a tensor of token ids (flattened into one stream).
        tokenizer: needed for text data.
        seq_len: window length (the model's context per prediction; default: the protocol's, 512 or 2048).
        stride: window step (default ``seq_len``: disjoint windows); smaller strides give every scored
            token more context at a proportional cost.
        max_tokens: use only the first tokens of the stream.
        batch_size: windows per forward pass.
        device: where the inputs go; default the model's device.
        protocol: ``"nsn"`` or ``"standard"`` (see the module docstring); under ``"standard"`` a text shorter
            than one window is an error.

    Returns:
        ``{"perplexity", "nll" (mean negative log-likelihood, nats/token), "tokens" (scored), "windows",
        "full_windows" (windows of the full ``seq_len``), "seq_len", "stride", "protocol", "seconds"}``. Under
        ``"nsn"``, data shorter than ``seq_len`` is still scored (one partial window) with a logged warning; the
        CLI refuses it.

    Raises:
        ValueError: bad ``seq_len``/``stride``/``protocol``, texts without a tokenizer, or too few tokens.
    """
    start_time = time.perf_counter()
    seq_len = seq_len or _check_protocol(protocol)["seq_len"]
    _check_protocol(protocol)
    stride = stride or seq_len
    windows = sliding_windows(0, seq_len, stride)  # validates the arguments before any tokenisation
    ids = _stream(data, tokenizer, max_tokens, protocol)
    check_token_ids(model, ids, "the perplexity data")
    if ids.numel() < 2:
        raise ValueError(f"Need at least 2 tokens to compute perplexity, got {ids.numel()}")
    windows = sliding_windows(ids.numel(), seq_len, stride)
    if protocol == "standard":
        windows = [w for w in windows if w[1] - w[0] == seq_len]
        if not windows:
            raise ValueError(
                f"The standard protocol scores whole windows of {seq_len} tokens; the text has only {ids.numel()}"
            )
    full_windows = sum(1 for begin, end, _ in windows if end - begin == seq_len)
    if not full_windows:
        logger.warning(
            "Only %d tokens, fewer than seq_len=%d: the perplexity covers one partial window of %d predictions and is "
            "not comparable with full-window results",
            ids.numel(),
            seq_len,
            ids.numel() - 1,
        )
    run_device = torch.device(resolve_device(device)) if device is not None else next(model.parameters()).device
    trim = _supports_logits_to_keep(model)
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64, device=run_device)
    total_tokens = 0
    try:
        groups = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
        for group in tqdm(groups, desc="Perplexity", unit="batch", disable=not show_progress):
            # Windows in a group share a length except possibly the last one of the text.
            for same in _by_length(group):
                batch = torch.stack([ids[b:e] for b, e, _ in same]).to(run_device)
                length = batch.shape[1]
                keep = max(s for _, _, s in same) + 1
                if trim and keep < length:
                    # Only the last `keep` positions predict scored tokens: skip the rest of the vocabulary
                    # projection (most of the cost when stride << seq_len).
                    logits = model(input_ids=batch, logits_to_keep=keep).logits
                else:
                    logits = model(input_ids=batch).logits
                positions = logits.shape[1]
                logits = logits[:, :-1].float()
                targets = batch[:, length - positions + 1 :]
                nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
                for row, (_, _, scored) in enumerate(same):
                    total_nll += nll[row, -scored:].double().sum()
                    total_tokens += scored
    finally:
        model.train(was_training)
    mean = total_nll.item() / total_tokens
    ppl = math.exp(mean) if mean < 700 else math.inf
    seconds = time.perf_counter() - start_time
    logger.info(
        "Perplexity %.4f over %d tokens (%d windows of %d, stride %d, %s protocol) in %.1fs",
        ppl,
        total_tokens,
        len(windows),
        seq_len,
        stride,
        protocol,
        seconds,
    )
    return {
        "perplexity": ppl,
        "nll": mean,
        "tokens": float(total_tokens),
        "windows": float(len(windows)),
        "full_windows": float(full_windows),
        "seq_len": float(seq_len),
        "stride": float(stride),
        "protocol": protocol,
        "seconds": seconds,
    }


def _by_length(windows):
    lengths: dict[int, list] = {}
    for window in windows:
        lengths.setdefault(window[1] - window[0], []).append(window)
    return lengths.values()


def perplexity(
    model: nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    seq_len: Optional[int] = None,
    stride: Optional[int] = None,
    max_tokens: Optional[int] = None,
    batch_size: int = 4,
    device: Optional[Union[str, torch.device]] = None,
    show_progress: bool = False,
    protocol: str = "nsn",
) -> float:
    """Sliding-window perplexity of ``model`` on ``data`` (arguments as :func:`evaluate_perplexity`)."""
    return evaluate_perplexity(
        model,
        data,
        tokenizer=tokenizer,
        seq_len=seq_len,
        stride=stride,
        max_tokens=max_tokens,
        batch_size=batch_size,
        device=device,
        show_progress=show_progress,
        protocol=protocol,
    )["perplexity"]
