"""The forward hooks behind calibration: input Grams ``Σ xxᵀ`` and output-gradient Grams ``Σ ggᵀ`` of chosen layers.

A collector is given ``{name: module}`` and accumulates while :meth:`attached`; the caller runs forward (and,
for gradients, backward) passes between :meth:`start_batch` and :meth:`end_batch`. The modules may be a
whole model's layers (:func:`nsn_peft.collect_activation_stats`) or one transformer block's (the sequential
pipeline, which runs a model block by block).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..linalg.gram import batch_gram

logger = logging.getLogger(__name__)

__all__ = ["InputGramCollector", "OutputGradientCollector", "all_reduce_sums", "layer_features"]


def layer_features(module: nn.Module) -> tuple[int, int]:
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


class InputGramCollector:
    """Forward pre-hooks accumulating input Grams: one product per distinct input tensor per batch.

    Layers reading the *same tensor object* (q/k/v, gate/up; they run one after another) share the product
    and, with ``share``, one accumulator: the first of them to run adds the batch Gram, the others only
    check that their input is that same tensor. Identity is tested through weak references, so no
    activation is kept alive, and two tensors that reuse one address are never confused. Should a layer
    ever receive another input than the layers it shares with, it gets its own accumulator, rebuilt exactly
    from the shared history (the batch Gram the shared one received is kept until the next batch).
    """

    def __init__(
        self, targets: Mapping[str, nn.Module], dtype: torch.dtype, device: torch.device, share: bool = True
    ) -> None:
        self.targets = dict(targets)
        self.sizes = {name: layer_features(m)[1] for name, m in targets.items()}
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

    @contextlib.contextmanager
    def attached(self) -> Iterator[InputGramCollector]:
        """The pre-hooks on every target within the block (removed on exit, also on errors)."""
        handles = [m.register_forward_pre_hook(self.hook(n)) for n, m in self.targets.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.end_batch()

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
            counts = all_reduce_sums([a.gram for a in distinct], [a.count for a in distinct])
            for acc, count in zip(distinct, counts):
                acc.count = count
        missing = [n for n in self.sizes if n not in self.accs]
        if missing:
            logger.warning(
                "%d targeted layer(s) never ran during calibration and have no statistics: %s",
                len(missing),
                missing[:5],
            )
        names = [n for n in self.sizes if n in self.accs]
        return {n: self.accs[n].gram for n in names}, {n: self.accs[n].count for n in names}


class OutputGradientCollector:
    """Forward hooks that register, on each target's output, a gradient hook adding ``Σ ggᵀ`` (``g = ∂L/∂y``).

    Padded positions (``keep`` of :meth:`start_batch`) are left out. Only outputs that require a gradient are
    hooked, so the forward pass must run with gradients enabled on the inputs.
    """

    def __init__(self, targets: Mapping[str, nn.Module], dtype: torch.dtype, device: torch.device) -> None:
        self.targets = dict(targets)
        self.grams = {
            name: torch.zeros(layer_features(m)[0], layer_features(m)[0], dtype=dtype, device=device)
            for name, m in targets.items()
        }
        self.counts = dict.fromkeys(targets, 0)
        self.keep: Optional[torch.Tensor] = None
        self.tokens = 0

    def start_batch(self, keep: Optional[torch.Tensor], tokens: int) -> None:
        self.keep, self.tokens = keep, tokens

    def end_batch(self) -> None:
        self.keep = None

    def hook(self, name: str):
        def forward_hook(module: nn.Module, args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if not (isinstance(out, torch.Tensor) and out.requires_grad):
                return
            keep, tokens = self.keep, self.tokens

            def grad_hook(grad: torch.Tensor) -> None:
                flat = grad.reshape(-1, grad.shape[-1])
                n = flat.shape[0]
                if keep is not None and keep.numel() == n:
                    flat, n = flat[keep], tokens
                self.grams[name].add_(batch_gram(flat))
                self.counts[name] += n

            out.register_hook(grad_hook)

        return forward_hook

    @contextlib.contextmanager
    def attached(self) -> Iterator[OutputGradientCollector]:
        handles = [m.register_forward_hook(self.hook(n)) for n, m in self.targets.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.end_batch()

    def result(self, all_reduce: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        if all_reduce:
            names = list(self.targets)
            counts = all_reduce_sums([self.grams[n] for n in names], [self.counts[n] for n in names])
            self.counts = dict(zip(names, counts))
        return self.grams, self.counts


def all_reduce_sums(tensors: list[torch.Tensor], counts: list[int]) -> list[int]:
    """Sum ``tensors`` (in place) and ``counts`` over the processes of the default ``torch.distributed`` group.

    Every process must pass the same tensors in the same order; the summed counts are returned.
    """
    for tensor in tensors:
        torch.distributed.all_reduce(tensor)
    device = tensors[0].device if tensors else torch.device("cpu")
    summed = torch.tensor(counts, dtype=torch.long, device=device)
    torch.distributed.all_reduce(summed)
    return [int(c) for c in summed.tolist()]
