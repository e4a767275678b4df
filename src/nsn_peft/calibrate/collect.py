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
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from tqdm.auto import tqdm

from ..data import load_texts, token_blocks
from ..devices import resolve_device
from ..layer_selection import LayerSelection, is_linear
from ..linalg.gram import batch_gram
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
            + (f", layers_to_transform={selection.layers_to_transform!r}" if selection.layers_to_transform is not None else "")
        )
    return targets


def _batches(data: Any, tokenizer, max_tokens: Optional[int], seq_len: int, batch_size: int) -> Iterable[dict]:
    if isinstance(data, (str, os.PathLike)) or hasattr(data, "column_names"):
        data = load_texts(data)  # a folder, a file, a dataset name or a datasets.Dataset
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], str):
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
            raise ValueError(f"A calibration tensor must be 1-D (a stream) or 2-D (blocks), got shape {tuple(data.shape)}")
        for start in range(0, data.shape[0], batch_size):
            yield {"input_ids": data[start : start + batch_size]}
        return
    if isinstance(data, (list, tuple)) and not data:
        raise ValueError("The calibration data is empty")
    for batch in data:
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch if batch.dim() == 2 else batch[None]}
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(f"Calibration batches must be dicts with 'input_ids' (and 'attention_mask'), got {type(batch).__name__}")
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
    model: nn.Module, data: Any, tokenizer: Any, max_tokens: Optional[int], seq_len: int, batch_size: int,
    device: torch.device, desc: str, show_progress: bool,
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


def _features(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear, ``Conv1D`` or NSN layer."""
    if isinstance(module, (nn.Linear, BaseTunerLayer)):
        return module.out_features, module.in_features
    d, m = module.weight.shape  # Conv1D stores (in_features, out_features)
    return m, d


class _Accumulator:
    """Running ``Σ xxᵀ`` of one distinct layer input, possibly shared by several layers reading it."""

    __slots__ = ("added_by", "batch", "count", "gram", "last_gram", "last_rows", "members", "ref")

    def __init__(self, gram: torch.Tensor) -> None:
        self.gram, self.count = gram, 0
        self.batch, self.ref, self.added_by = -1, None, None
        self.last_gram: Optional[torch.Tensor] = None
        self.last_rows = 0
        self.members: set[str] = set()


class _GramCollector:
    """Forward pre-hooks accumulating input Grams: one product per distinct input tensor per batch.

    Layers reading the *same tensor object* (q/k/v, gate/up; they run one after another) share the product
    and, with ``share``, one accumulator: the first of them to run adds the batch Gram, the others only
    check that their input is that same tensor. Identity is tested through weak references, so no
    activation is kept alive, and two tensors that reuse one address are never confused. Should a layer
    ever receive another input than the layers it shares with, it gets its own accumulator, rebuilt exactly
    from the shared history (the batch Gram the shared one received is kept until the next batch).
    """

    def __init__(self, targets: Mapping[str, nn.Module], dtype: torch.dtype, device: torch.device, share: bool) -> None:
        self.sizes = {name: _features(m)[1] for name, m in targets.items()}
        self.dtype, self.device, self.share = dtype, device, share
        self.accs: dict[str, _Accumulator] = {}
        self.batch = 0
        self.mask: Optional[torch.Tensor] = None
        self.rows = 0
        self.last: Optional[tuple] = None  # (weakref to the input, batch Gram, rows, accumulator)

    def start_batch(self, mask: Optional[torch.Tensor], rows: int) -> None:
        self.batch += 1
        self.mask, self.rows, self.last = mask, rows, None

    def end_batch(self) -> None:
        self.last, self.mask = None, None

    def _batch_gram(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        if self.mask is not None and self.mask.numel() == rows:
            flat, rows = flat[self.mask], self.rows
        # (A layer that sees another token layout, e.g. a routed expert, counts all of its rows.)
        return batch_gram(flat), rows

    def _new(self, name: str) -> _Accumulator:
        d = self.sizes[name]
        acc = _Accumulator(torch.zeros(d, d, dtype=self.dtype, device=self.device))
        acc.members.add(name)
        self.accs[name] = acc
        return acc

    def _split(self, name: str, shared: _Accumulator) -> _Accumulator:
        """Give ``name`` its own accumulator: the shared history before this batch."""
        if shared.added_by is None or shared.last_gram is None:
            raise RuntimeError(
                f"Calibration could not separate the statistics of '{name}' from the layers sharing its input; "
                "pass share_inputs=False"
            )
        shared.members.discard(name)
        acc = _Accumulator(shared.gram - shared.last_gram.to(shared.gram.dtype))
        acc.count = shared.count - shared.last_rows
        acc.members.add(name)
        self.accs[name] = acc
        return acc

    def hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            acc = self.accs.get(name)
            if acc is not None and acc.batch == self.batch and acc.added_by != name and acc.ref() is x:
                return  # a layer sharing this input already added it in this batch
            last = self.last
            if last is not None and last[0]() is x:
                gram, rows, last_acc = last[1], last[2], last[3]
                if self.share and acc is None and last_acc.batch == self.batch and last_acc.ref() is x:
                    last_acc.members.add(name)  # first time seen, same input as the previous layer: share
                    self.accs[name] = last_acc
                    return
            else:
                gram, rows = self._batch_gram(x)
            if acc is None:
                acc = self._new(name)
            elif acc.batch == self.batch and len(acc.members) > 1 and acc.added_by != name:
                acc = self._split(name, acc)  # shares an accumulator but received a different input
            acc.gram.add_(gram)  # float32 batch product into the float64 sum: one fused kernel
            acc.count += rows
            acc.batch, acc.ref, acc.added_by = self.batch, weakref.ref(x), name
            acc.last_gram = gram if len(acc.members) > 1 else None  # kept only where a split may need it
            acc.last_rows = rows
            self.last = (weakref.ref(x), gram, rows, acc)

        return pre_hook

    def result(self, all_reduce: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        distinct = list({id(a): a for a in self.accs.values()}.values())
        if all_reduce:
            # Every process must reduce the same tensors in the same order: layers never reached here
            # (e.g. an expert without tokens) get zero matrices first.
            for name in self.sizes:
                if name not in self.accs:
                    self._new(name)
            distinct = [self.accs[n] for n in self.sizes]
            distinct = list({id(a): a for a in distinct}.values())
            for acc in distinct:
                torch.distributed.all_reduce(acc.gram)
            counts = torch.tensor([a.count for a in distinct], dtype=torch.long, device=self.device)
            torch.distributed.all_reduce(counts)
            for acc, count in zip(distinct, counts.tolist()):
                acc.count = int(count)
        missing = [n for n in self.sizes if n not in self.accs]
        if missing:
            logger.warning("%d targeted layer(s) never ran during calibration and have no statistics: %s",
                           len(missing), missing[:5])
        names = [n for n in self.sizes if n in self.accs]
        return {n: self.accs[n].gram for n in names}, {n: self.accs[n].count for n in names}


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
        data: a list of texts (with ``tokenizer``); a folder, text/JSONL file, ``datasets.Dataset`` or dataset
            name (read with :func:`nsn_peft.data.load_texts`); a tensor of token ids (``(n, seq_len)``
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
    targets = calibration_targets(model, target_modules, exclude_modules=exclude_modules,
                                  layers_to_transform=layers_to_transform, layers_pattern=layers_pattern)
    run_device = _run_device(model, device)
    if run_device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        logger.warning("float32 matmul precision is %r (TF32): the Gram matrices lose precision in their small "
                       "directions; torch.set_float32_matmul_precision('highest') is recommended for calibration",
                       torch.get_float32_matmul_precision())
    collector = _GramCollector(targets, dtype, run_device, share_inputs)
    forward_kwargs = _forward_kwargs(model, targets)
    handles = [m.register_forward_pre_hook(collector.hook(n)) for n, m in targets.items()]
    seen = 0
    batches = _token_batches(model, data, tokenizer, max_tokens, seq_len, batch_size, run_device, "Calibrating", show_progress)
    try:
        for batch in batches:
            collector.start_batch(batch.keep, batch.tokens)
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **forward_kwargs)
            collector.end_batch()
            seen += batch.tokens
    finally:
        batches.close()
        for handle in handles:
            handle.remove()
        collector.end_batch()
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
    targets = calibration_targets(model, target_modules, exclude_modules=exclude_modules,
                                  layers_to_transform=layers_to_transform, layers_pattern=layers_pattern)
    run_device = _run_device(model, device)
    grams = {name: torch.zeros(_features(m)[0], _features(m)[0], dtype=dtype, device=run_device) for name, m in targets.items()}
    counts = dict.fromkeys(targets, 0)
    current: dict[str, Any] = {"keep": None, "tokens": 0}

    def make_hook(name: str):
        def forward_hook(module: nn.Module, args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if not (isinstance(out, torch.Tensor) and out.requires_grad):
                return
            keep, tokens = current["keep"], current["tokens"]

            def grad_hook(grad: torch.Tensor) -> None:
                flat = grad.reshape(-1, grad.shape[-1])
                n = flat.shape[0]
                if keep is not None and keep.numel() == n:
                    flat, n = flat[keep], tokens
                grams[name].add_(batch_gram(flat))
                counts[name] += n

            out.register_hook(grad_hook)

        return forward_hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in targets.items()]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    seen = 0
    batches = _token_batches(model, data, tokenizer, max_tokens, seq_len, batch_size, run_device, "Output gradients",
                             show_progress)
    try:
        for batch in batches:
            current["keep"], current["tokens"] = batch.keep, batch.tokens
            labels = batch.input_ids.clone()
            if batch.attention_mask is not None:
                labels[batch.attention_mask == 0] = -100
            with torch.enable_grad():
                inputs = embeddings(batch.input_ids).detach().requires_grad_(True)
                output = model(inputs_embeds=inputs, attention_mask=batch.attention_mask, use_cache=False)
                logits = output.logits[:, :-1].float()
                # The *summed* loss, so that batches of any size add up consistently.
                loss = nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum")
                loss.backward()
            seen += batch.tokens
    finally:
        batches.close()
        for handle in handles:
            handle.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    if seen == 0:
        raise ValueError("Gradient calibration data produced no tokens")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for gram in grams.values():
            torch.distributed.all_reduce(gram)
        count_tensor = torch.tensor([counts[n] for n in targets], dtype=torch.long, device=run_device)
        torch.distributed.all_reduce(count_tensor)
        counts = {n: int(c) for n, c in zip(targets, count_tensor.tolist())}
    seen = _all_reduce_count(seen, run_device)
    out_device = torch.device(stats_device) if stats_device is not None else run_device
    extra = {"kind": "output_gradient", "seq_len": seq_len, "tokens": seen, "accumulate_dtype": str(dtype).removeprefix("torch.")}
    logger.info("Collected output-gradient statistics of %d layers over %d tokens", len(grams), seen)
    return ActivationStats({n: g.to(out_device) for n, g in grams.items()}, counts, _model_id(model), extra)
