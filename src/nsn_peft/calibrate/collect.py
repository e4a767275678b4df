"""Calibration: accumulate the input Gram ``XᵀX`` of every targeted linear layer with forward hooks.

Memory is one d×d matrix per layer, never the activations. Layers that read the *same* input tensor
(q/k/v, gate/up) share one Gram product per batch, which keeps the overhead over a plain forward small.
Per-batch products are float32 GEMMs (:func:`batch_gram`); the running sums are float64, because summing
millions of outer products of activations with outlier features (~1e3) in float32 drops exactly the small
directions whitening needs.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import iter_texts, token_blocks
from ..devices import resolve_device
from ..layer_selection import LayerSelection, is_linear
from .hooks import InputGramCollector, OutputGradientCollector
from .stats import ActivationStats

logger = logging.getLogger(__name__)

__all__ = ["calibration_targets", "collect_activation_stats", "collect_gradient_stats"]


def calibration_targets(
    model: nn.Module,
    target_modules: Union[None, str, Sequence[str], LayerSelection] = None,
    *,
    exclude_modules: Union[None, str, Sequence[str]] = None,
    layers_to_transform: Union[None, int, Sequence[int]] = None,
    layers_pattern: Union[None, str, Sequence[str]] = None,
) -> dict[str, nn.Module]:
    """``{canonical name: module}`` whose inputs are recorded: the layers an NSN adapter with the same options
    adapts (:class:`~nsn_peft.layer_selection.LayerSelection`; an NSN or other PEFT tuner layer counts as its
    base layer). The default target leaves the output head out; a regex may name it."""
    if isinstance(target_modules, LayerSelection):
        selection = target_modules
    else:
        selection = LayerSelection(target_modules, exclude_modules, layers_to_transform, layers_pattern)
    targets = selection.select(model)
    for name, module in targets.items():
        if not is_linear(module):
            raise TypeError(
                f"target_modules={selection.target_modules!r} selects '{name}' ({type(module).__name__}), which NSN "
                "cannot adapt: only nn.Linear and transformers' Conv1D layers are; name the linear layers inside it."
            )
    if not targets:
        raise ValueError(
            f"No linear layer of {type(model).__name__} matches target_modules={selection.target_modules!r}"
            + (f", exclude_modules={selection.exclude_modules!r}" if selection.exclude_modules else "")
            + (
                f", layers_to_transform={selection.layers_to_transform!r}"
                if selection.layers_to_transform is not None
                else ""
            )
        )
    return targets


def _batches(data: Any, tokenizer, max_tokens: Optional[int], seq_len: int, batch_size: int) -> Iterable[dict]:
    texts = isinstance(data, (list, tuple)) and bool(data) and isinstance(data[0], str)
    if isinstance(data, (str, os.PathLike)) or hasattr(data, "column_names"):
        # A folder, a file, a dataset name (streamed) or a datasets (Iterable)Dataset: read lazily, so that
        # reading stops at max_tokens.
        data, texts = iter_texts(data), True
    if texts:
        if tokenizer is None:
            raise ValueError("Texts need a tokenizer: collect_activation_stats(model, texts, tokenizer=tok)")
        data = token_blocks(data, tokenizer, seq_len, max_tokens)
    if isinstance(data, torch.Tensor):
        if data.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise TypeError(f"A calibration tensor must hold token ids (integers), got dtype {data.dtype}")
        if data.dim() == 1:
            if data.numel() < seq_len:
                raise ValueError(f"The token stream has {data.numel()} tokens, fewer than seq_len={seq_len}")
            data = data[: data.numel() // seq_len * seq_len].view(-1, seq_len)
        elif data.dim() != 2:
            raise ValueError(
                f"A calibration tensor must be 1-D (a stream) or 2-D (blocks), got shape {tuple(data.shape)}"
            )
        for start in range(0, data.shape[0], batch_size):
            yield {"input_ids": data[start : start + batch_size]}
        return
    if isinstance(data, (list, tuple)) and not data:
        raise ValueError("The calibration data is empty")
    for batch in data:
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch if batch.dim() == 2 else batch[None]}
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(
                f"Calibration batches must be dicts with 'input_ids' (and 'attention_mask'), got {type(batch).__name__}"
            )
        yield batch


def _forward_kwargs(model: nn.Module, targets: Mapping[str, nn.Module]) -> dict[str, Any]:
    """Extra forward arguments that skip work calibration does not need.

    ``logits_to_keep=1`` makes transformers' causal LMs project only the last position onto the vocabulary
    (the head is not calibrated, and its full-vocabulary product is ~20% of a small model's forward).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins / exotic wrappers
        return {}
    kwargs: dict[str, Any] = {}
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if "logits_to_keep" in params and (head is None or all(m is not head for m in targets.values())):
        kwargs["logits_to_keep"] = 1
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


class _TokenBatch(NamedTuple):
    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    keep: Optional[torch.Tensor]  # flat bool mask of the real tokens; None when nothing is padding
    tokens: int  # real (non-padding) tokens


def _run_device(model: nn.Module, device: Optional[Union[str, torch.device]]) -> torch.device:
    """``device`` (the model is moved there if needed), or the model's own device."""
    current = next(model.parameters()).device
    if device is None:
        return current
    run_device = torch.device(resolve_device(device))
    if current != run_device:
        logger.info("Moving the model to %s for calibration", run_device)
        model.to(run_device)
    return run_device


def _token_batches(
    model: nn.Module,
    data: Any,
    tokenizer: Any,
    max_tokens: Optional[int],
    seq_len: int,
    batch_size: int,
    device: torch.device,
    desc: str,
    show_progress: bool,
) -> Iterator[_TokenBatch]:
    """Calibration batches on ``device`` (model in eval mode meanwhile), a progress bar, and a stop at ``max_tokens``."""
    was_training = model.training
    model.eval()
    seen = 0
    progress = tqdm(total=max_tokens, desc=desc, unit="tok", disable=not show_progress)
    try:
        for batch in _batches(data, tokenizer, max_tokens, seq_len, batch_size):
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            keep, n = None, ids.numel()
            if mask is not None:
                mask = mask.to(device)
                flat = mask.reshape(-1).bool()
                n = int(flat.sum())
                keep = None if n == flat.numel() else flat  # no padding: no gather later
            yield _TokenBatch(ids, mask, keep, n)
            seen += n
            progress.update(n)
            if max_tokens is not None and seen >= max_tokens:
                break
    finally:
        progress.close()
        model.train(was_training)


def _all_reduce_count(count: int, device: torch.device) -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return count
    tensor = torch.tensor([count], dtype=torch.long, device=device)
    torch.distributed.all_reduce(tensor)
    return int(tensor.item())


def _model_id(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    model_id = getattr(config, "_name_or_path", None) or getattr(config, "model_type", None)
    return str(model_id) if model_id else None


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    max_tokens: Optional[int] = 65536,
    seq_len: int = 512,
    batch_size: int = 8,
    target_modules: Union[None, str, Sequence[str], LayerSelection] = None,
    exclude_modules: Union[None, str, Sequence[str]] = None,
    layers_to_transform: Union[None, int, Sequence[int]] = None,
    layers_pattern: Union[None, str, Sequence[str]] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float64,
    stats_device: Optional[Union[str, torch.device]] = "cpu",
    share_inputs: bool = True,
    show_progress: bool = True,
) -> ActivationStats:
    """Run ``model`` over calibration data and return the input Gram matrix ``Σ xxᵀ`` of every targeted layer.

    Args:
        model: a transformers model, or a ``PeftModel`` with NSN layers (their inputs are recorded under the
            plain base-model names; the model runs as it is, i.e. at its current ranks).
        data: a list of texts (with ``tokenizer``); a folder, text/JSONL file, ``datasets.Dataset`` /
            ``IterableDataset`` or dataset name (read lazily with :func:`nsn_peft.data.iter_texts`, Hub names
            streamed: reading stops at ``max_tokens``); a tensor of token ids (``(n, seq_len)``
            blocks or a 1-D stream cut into ``seq_len`` blocks); or an iterable/``DataLoader`` of dicts with
            ``input_ids`` and optional ``attention_mask`` (padded positions are excluded from the statistics).
        tokenizer: needed for text data.
        max_tokens: stop after this many (non-padding) tokens; ``None`` = all.
        seq_len: block length when cutting text or a token stream.
        batch_size: blocks per forward pass (texts and tensors; a DataLoader brings its own batches).
        target_modules: layer names (suffix match, as in PEFT) or a regex (full match); default every
            linear / ``Conv1D`` layer except the output head. With ``exclude_modules``, ``layers_to_transform``
            and ``layers_pattern`` (``NSNConfig``'s meaning), the statistics cover exactly the layers an adapter
            with the same options adapts.
        device: where to run; default the model's device (the model is moved there if needed).
        dtype: accumulator dtype; float64 recommended (see the module docstring).
        stats_device: where the returned matrices live (``"cpu"``; ``None`` keeps them on the run device,
            which avoids a device-to-host copy when they are used right away).
        share_inputs: layers that read the same input tensor (q/k/v, gate/up) share one accumulator (less
            memory, fewer kernels); ``False`` gives every layer its own (the Gram product is computed once per
            distinct input either way).
        show_progress: tqdm progress bar over tokens.

    Returns:
        :class:`~nsn_peft.ActivationStats` with the model id (``config._name_or_path``) and, in ``extra``,
        the token count, ``seq_len`` and accumulator dtype.

    Raises:
        ValueError: no layer matches ``target_modules``, texts without a tokenizer, or no tokens at all.
        TypeError: batches that are not dicts with ``input_ids``.

    Memory is one d×d accumulator per distinct layer input (plus a batch Gram), whatever the number of tokens. Under
    ``torch.distributed`` each process runs on the data it is given (pass each rank its own shard) and the
    sums and token counts are all-reduced, so every process returns the global statistics.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive or None, got {max_tokens}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    targets = calibration_targets(
        model,
        target_modules,
        exclude_modules=exclude_modules,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
    )
    run_device = _run_device(model, device)
    if run_device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        logger.warning(
            "float32 matmul precision is %r (TF32): the Gram matrices lose precision in their small "
            "directions; torch.set_float32_matmul_precision('highest') is recommended for calibration",
            torch.get_float32_matmul_precision(),
        )
    collector = InputGramCollector(targets, dtype, run_device, share_inputs)
    forward_kwargs = _forward_kwargs(model, targets)
    seen = 0
    batches = _token_batches(
        model, data, tokenizer, max_tokens, seq_len, batch_size, run_device, "Calibrating", show_progress
    )
    try:
        with collector.attached():
            for batch in batches:
                collector.start_batch(batch.keep, batch.tokens)
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **forward_kwargs)
                collector.end_batch()
                seen += batch.tokens
    finally:
        batches.close()
    if seen == 0:
        raise ValueError("Calibration data produced no tokens")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    grams, counts = collector.result(distributed)
    seen = _all_reduce_count(seen, run_device)
    logger.info("Collected activation statistics of %d layers over %d tokens", len(grams), seen)
    out_device = torch.device(stats_device) if stats_device is not None else run_device
    extra = {"seq_len": seq_len, "tokens": seen, "accumulate_dtype": str(dtype).removeprefix("torch.")}
    # Layers that shared an accumulator (one input) share one matrix: half the memory, and saved once.
    moved: dict[int, torch.Tensor] = {}
    out = {name: moved.setdefault(id(gram), gram.to(out_device)) for name, gram in grams.items()}
    return ActivationStats(out, counts, _model_id(model), extra)


def collect_gradient_stats(
    model: nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    max_tokens: Optional[int] = 8192,
    seq_len: int = 512,
    batch_size: int = 4,
    target_modules: Union[None, str, Sequence[str], LayerSelection] = None,
    exclude_modules: Union[None, str, Sequence[str]] = None,
    layers_to_transform: Union[None, int, Sequence[int]] = None,
    layers_pattern: Union[None, str, Sequence[str]] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float64,
    stats_device: Optional[Union[str, torch.device]] = "cpu",
    show_progress: bool = True,
) -> ActivationStats:
    """Output-gradient Gram matrices ``G = Σ g gᵀ`` (m×m) of the language-modelling loss, per targeted layer.

    ``g = ∂L/∂y`` is the gradient of the summed next-token loss with respect to the layer's output at one
    position. To second order, perturbing the outputs by ``δy`` raises the loss by about
    ``½ Σ δyᵀ G δy / n`` (the empirical Fisher approximation), so ``G`` turns output errors into loss units:
    :func:`nsn_peft.rank_search.allocate_ranks_for_budget` uses it (``gradient_stats=``) to compare the
    truncation errors of different layers. One forward and backward pass per batch; parameter gradients are
    not computed (the parameters are frozen meanwhile and restored afterwards).

    Arguments are those of :func:`collect_activation_stats` (``data`` must give token ids; padded positions,
    per ``attention_mask``, are excluded). Returns an :class:`~nsn_peft.ActivationStats` whose matrices are
    the ``G`` (shape ``out_features²``) with ``extra["kind"] = "output_gradient"``; save and load it like
    activation statistics.
    """
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"seq_len must be >= 2 and batch_size positive, got {seq_len} and {batch_size}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        raise TypeError(f"{type(model).__name__} has no input embeddings; gradient statistics need a language model")
    targets = calibration_targets(
        model,
        target_modules,
        exclude_modules=exclude_modules,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
    )
    run_device = _run_device(model, device)
    collector = OutputGradientCollector(targets, dtype, run_device)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    seen = 0
    batches = _token_batches(
        model, data, tokenizer, max_tokens, seq_len, batch_size, run_device, "Output gradients", show_progress
    )
    try:
        with collector.attached():
            for batch in batches:
                collector.start_batch(batch.keep, batch.tokens)
                labels = batch.input_ids.clone()
                if batch.attention_mask is not None:
                    labels[batch.attention_mask == 0] = -100
                with torch.enable_grad():
                    inputs = embeddings(batch.input_ids).detach().requires_grad_(True)
                    output = model(inputs_embeds=inputs, attention_mask=batch.attention_mask, use_cache=False)
                    logits = output.logits[:, :-1].float()
                    # The *summed* loss, so that batches of any size add up consistently.
                    loss = nn.functional.cross_entropy(
                        logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum"
                    )
                    loss.backward()
                seen += batch.tokens
    finally:
        batches.close()
        for p, flag in frozen:
            p.requires_grad_(flag)
    if seen == 0:
        raise ValueError("Gradient calibration data produced no tokens")
    grams, counts = collector.result(torch.distributed.is_available() and torch.distributed.is_initialized())
    seen = _all_reduce_count(seen, run_device)
    out_device = torch.device(stats_device) if stats_device is not None else run_device
    extra = {
        "kind": "output_gradient",
        "seq_len": seq_len,
        "tokens": seen,
        "accumulate_dtype": str(dtype).removeprefix("torch."),
    }
    logger.info("Collected output-gradient statistics of %d layers over %d tokens", len(grams), seen)
    return ActivationStats({n: g.to(out_device) for n, g in grams.items()}, counts, _model_id(model), extra)
