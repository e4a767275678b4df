"""FLOPs, parameter counts and the rank grid of factored layers (pure arithmetic, no torch state).

A dense layer ``W`` (m×d) costs ``2·m·d`` FLOPs per token; its rank-r factorisation ``B[:, :r] @ A[:r]``
costs ``2·r·(m+d)``. Ranks offered by selection helpers sit on a grid of multiples of ``granularity``
because GEMMs with unaligned inner dimensions run far below peak on GPUs.
"""

from __future__ import annotations

import math


def dense_flops(out_features: int, in_features: int, tokens: int = 1) -> int:
    return 2 * out_features * in_features * tokens


def factored_flops(out_features: int, in_features: int, rank: int, tokens: int = 1) -> int:
    return 2 * rank * (out_features + in_features) * tokens


def factored_params(out_features: int, in_features: int, rank: int) -> int:
    return rank * (out_features + in_features)


def factoring_saves(out_features: int, in_features: int, rank: int) -> bool:
    """Whether a rank-``rank`` factorisation is smaller than the dense matrix (``r(m+d) < md``)."""
    return rank * (out_features + in_features) < out_features * in_features


def break_even_rank(out_features: int, in_features: int) -> int:
    """Largest rank whose factorisation is still strictly smaller than the dense matrix."""
    return max(0, (out_features * in_features - 1) // (out_features + in_features))


def rank_grid(max_rank: int, granularity: int) -> list[int]:
    """Selectable ranks: multiples of ``granularity`` below ``max_rank``, plus ``max_rank`` itself."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if granularity < 1:
        raise ValueError(f"rank granularity must be >= 1, got {granularity}")
    grid = list(range(granularity, max_rank, granularity))
    grid.append(max_rank)
    return grid


def round_rank_down(rank: float, max_rank: int, granularity: int) -> int:
    """The largest grid rank <= ``rank`` (at least the smallest grid rank)."""
    grid = rank_grid(max_rank, granularity)
    best = grid[0]
    for candidate in grid:
        if candidate <= rank:
            best = candidate
    return best


def fraction_rank(fraction: float, max_rank: int, granularity: int) -> int:
    """Rank for ``fraction`` of ``max_rank``: rounded down to the grid, so still aligned on large layers.

    A layer whose max rank is not above ``granularity`` has no grid rank below its max; its rank is then
    ``floor(fraction * max_rank)`` (at least 1), so fractions move small layers too.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if max_rank <= granularity:
        return max(1, math.floor(fraction * max_rank + 1e-9))
    return round_rank_down(fraction * max_rank, max_rank, granularity)


def rank_for_flops_fraction(
    out_features: int, in_features: int, fraction: float, max_rank: int, granularity: int
) -> int:
    """Largest grid rank whose FLOPs are at most ``fraction`` of the dense layer's."""
    if not 0 < fraction:
        raise ValueError(f"FLOPs fraction must be > 0, got {fraction}")
    exact = fraction * out_features * in_features / (out_features + in_features)
    return round_rank_down(exact, max_rank, granularity)


def rank_for_params_fraction(out_features: int, in_features: int, fraction: float, granularity: int) -> int:
    """Largest rank on the grid whose factors hold at most ``fraction`` of the dense parameters.

    ``fraction=1`` is the break-even rank ``md/(m+d)`` rounded down to a multiple of ``granularity``, so the
    factors ``r(m+d)`` never outgrow the dense ``md``. A layer too small for one grid step keeps
    ``floor(fraction·md/(m+d))`` (at least 1).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"parameter fraction must be in (0, 1], got {fraction}")
    if granularity < 1:
        raise ValueError(f"rank granularity must be >= 1, got {granularity}")
    # Integer arithmetic where possible: the budget must not round up on an exact break-even (e.g. 4096×4096).
    exact = (
        out_features * in_features // (out_features + in_features)
        if fraction == 1
        else int(fraction * out_features * in_features / (out_features + in_features))
    )
    exact = min(exact, min(out_features, in_features))
    on_grid = exact // granularity * granularity
    return on_grid if on_grid >= 1 else max(1, exact)
