"""Switching ranks under ``torch.compile`` without recompiling: warm the ranks a server offers once.

An ``NSNLinear`` reads its active rank from the size of a zero-byte tensor that torch.compile treats as a
dynamic size, so one compiled graph serves every rank from 2 to the max rank (rank 1 is specialised by
dynamo and compiles once more; so does a first mix of different ranks across layers). With
``mode="reduce-overhead"`` each new rank records one CUDA graph on its first call (no compilation).
:func:`compile_for_ranks` does those first calls up front and reports what each cost.

The rank stays symbolic under ``torch.compile(dynamic=False)`` too (an explicit dynamic mark is kept), so
``generate``'s own compilation benefits as well. Should a graph specialise on the rank anyway (a torch
version that drops the mark, a graph that branches on it), every rank compiles its own graph:
:func:`compile_for_ranks` notices, raises dynamo's recompile limit to hold all warmed ranks, warns, and (by
default) makes dynamo raise instead of silently falling back to eager when the limit is hit later.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from . import ranks as _ranks
from .rank_spec import RankLike, RankSpec
from .runtime import set_runtime_options

__all__ = ["RankCompilation", "compile_for_ranks", "compiled_graph_count"]

logger = logging.getLogger(__name__)


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process so far (its ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class RankCompilation:
    """What warming each rank cost: seconds of the first call and graphs compiled by it.

    ``module`` is the compiled model when :func:`compile_for_ranks` compiled it (``warmup`` not given).
    """

    ranks: list[Any]
    seconds: list[float]
    new_graphs: list[int]
    module: Optional[Callable[..., Any]] = field(default=None, repr=False)

    @property
    def recompiles_after_first(self) -> int:
        """Graphs compiled by every rank after the first (0 when the rank stays symbolic)."""
        return sum(self.new_graphs[1:])


RankItem = Union[RankLike, float]


def _spec(item: RankItem) -> RankSpec:
    if isinstance(item, float):
        warnings.warn(
            f"compile_for_ranks: a bare float ({item!r}) as a fraction of the max rank is deprecated; pass "
            f"RankSpec.fraction({item!r}) (or RankSpec.flops({item!r}) for a stored FLOPs budget).",
            FutureWarning,
            stacklevel=3,
        )
        return RankSpec.fraction(item)
    return RankSpec.coerce(item)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def compile_for_ranks(
    model: nn.Module,
    ranks: Sequence[RankItem],
    warmup: Optional[Callable[[], Any]] = None,
    *,
    example_inputs: Optional[Union[tuple, Mapping[str, Any]]] = None,
    fail_on_recompile_limit: bool = True,
    **compile_kwargs: Any,
) -> RankCompilation:
    """Warm a compiled NSN model at every rank in ``ranks`` so that switching among them later compiles nothing.

    Args:
        model: A ``PeftModel``/``NSNModel`` or any module holding NSN layers (ranks are set on it).
        ranks: Operating points, each what ``set_rank`` accepts: a :class:`~nsn_peft.RankSpec` (a rank, a
            fraction of each layer's max rank, a stored FLOPs budget, per-layer ranks), an int or a
            ``{module: rank}`` dict. A bare float still means a fraction but is deprecated (it could be a budget).
        warmup: A call that runs the compiled model, e.g. ``lambda: compiled(ids)`` or
            ``lambda: model.generate(ids, max_new_tokens=2, cache_implementation="static")`` (``generate``
            compiles its decode step itself). Omit it to let this function compile ``model`` with
            ``torch.compile(model, **compile_kwargs)`` and call it on ``example_inputs``.
        example_inputs: Positional (tuple) or keyword (dict) inputs of ``model`` when ``warmup`` is omitted.
        fail_on_recompile_limit: When each rank turns out to compile its own graph, also
            set ``torch._dynamo.config.fail_on_recompile_limit_hit`` so that a later rank past the limit
            raises instead of silently running eager.

    Returns:
        A :class:`RankCompilation` (``module`` is the compiled model when this function compiled it). The
        model is back at the rank it had before.
    """
    if not ranks:
        raise ValueError("compile_for_ranks needs at least one rank to warm")
    specs = [_spec(item) for item in ranks]
    for spec in specs:
        _ranks.ranks_at(model, spec)  # every point is checked before anything compiles
    compiled = None
    if warmup is None:
        if example_inputs is None:
            raise ValueError("compile_for_ranks: pass warmup=<callable> or example_inputs=(...) to call the model with")
        compiled = torch.compile(model, **compile_kwargs)
        if isinstance(example_inputs, Mapping):

            def warmup() -> Any:
                return compiled(**example_inputs)
        else:
            inputs = tuple(example_inputs)

            def warmup() -> Any:
                return compiled(*inputs)
    elif compile_kwargs:
        raise ValueError(f"compile_for_ranks: compile options {sorted(compile_kwargs)} apply only without warmup=")
    set_runtime_options(
        model, rank_major=True
    )  # a row-major nsn_B would make the compiled graph specialise on the rank
    previous = _ranks.get_rank(model)
    seconds, new_graphs = [], []
    try:
        for spec in specs:
            _ranks.set_rank(model, spec)
            before = compiled_graph_count()
            start = time.perf_counter()
            with torch.no_grad():
                warmup()
            _sync()
            seconds.append(time.perf_counter() - start)
            new_graphs.append(compiled_graph_count() - before)
            logger.info("Warmed %s: %.2fs, %d new graph(s)", spec, seconds[-1], new_graphs[-1])
            if len(new_graphs) == 2 and new_graphs[1] > 0:
                _rank_is_static(len(ranks), fail_on_recompile_limit)
    finally:
        _ranks.set_rank(model, RankSpec.layers(previous))
    return RankCompilation(list(ranks), seconds, new_graphs, compiled)


def _rank_is_static(n_ranks: int, fail_on_limit: bool) -> None:
    """The second rank compiled again: the graph specialises on the rank; keep all warmed ranks compiled."""
    config = torch._dynamo.config
    needed = n_ranks + 4  # the warmed ranks, plus room for batch sizes and rank 1
    if config.recompile_limit < needed:
        config.recompile_limit = needed
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * needed)
    if fail_on_limit:
        config.fail_on_recompile_limit_hit = True
    warnings.warn(
        "compile_for_ranks: each rank compiles its own graph here (the compiled code specialises on the rank). "
        f"Raised torch._dynamo.config.recompile_limit to {config.recompile_limit} to hold the warmed ranks"
        + ("; a rank past that limit now raises instead of silently running eager." if fail_on_limit else "."),
        stacklevel=3,
    )
