"""The active ranks of a layer's adapters, each beside the zero-byte tensor whose size ``forward`` reads it from.

``forward`` reads a layer's rank from a tensor size instead of a Python int, so that torch.compile keeps the
rank symbolic and one compiled graph serves every rank (see :func:`_rank_carrier`).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ActiveRanks"]


def _rank_carrier(rank: int) -> torch.Tensor:
    """A zero-byte meta tensor whose last size is ``rank``.

    ``forward`` reads the rank from this size instead of a Python int: torch.compile treats a size marked
    dynamic as a symbol, so one compiled graph serves every rank >= 2 (an int attribute is a constant that is
    guarded on, one recompilation per rank). The tensor is never an input of the compiled graph, only its size.
    """
    carrier = torch.empty(0, rank, device="meta")
    torch._dynamo.maybe_mark_dynamic(carrier, 1)
    return carrier


# Carriers a layer keeps for ranks it ran at before. Making one costs ~4 µs, most of a rank switch of a
# 224-layer model; a switch back to a rank seen before reuses it. Each layer keeps its own: layers sharing
# one tensor would make torch.compile guard on which layers alias, and recompile when that changes.
_CARRIERS_KEPT = 64


class ActiveRanks(dict):
    """``{adapter: rank}`` that keeps, beside each rank, its :func:`_rank_carrier` in ``carriers``."""

    def __init__(self, carriers: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.carriers = carriers
        self._made: dict[int, torch.Tensor] = {}

    def __setitem__(self, adapter: str, rank: int) -> None:
        super().__setitem__(adapter, rank)
        rank = int(rank)
        carrier = self._made.get(rank)
        if carrier is None:
            if len(self._made) >= _CARRIERS_KEPT:
                self._made.clear()
            carrier = self._made[rank] = _rank_carrier(rank)
        self.carriers[adapter] = carrier

    def __delitem__(self, adapter: str) -> None:
        super().__delitem__(adapter)
        self.carriers.pop(adapter, None)

    def pop(self, adapter: str, *default: Any) -> Any:
        self.carriers.pop(adapter, None)
        return super().pop(adapter, *default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for adapter, rank in dict(*args, **kwargs).items():
            self[adapter] = rank

    def setdefault(self, adapter: str, rank: int) -> int:
        if adapter not in self:
            self[adapter] = rank
        return self[adapter]

    def clear(self) -> None:
        super().clear()
        self.carriers.clear()

    def __deepcopy__(self, memo: dict) -> ActiveRanks:
        carriers: dict[str, torch.Tensor] = {}
        copy = ActiveRanks(carriers)
        copy.update(dict(self))
        return copy

    def __reduce__(self):
        return (_rebuild_active_ranks, (dict(self),))


def _rebuild_active_ranks(ranks: dict[str, int]) -> ActiveRanks:
    active = ActiveRanks({})
    active.update(ranks)
    return active
