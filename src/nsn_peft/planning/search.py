"""ε search: the lowest energy per layer group whose factorisation keeps a metric within ε of the dense model."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..calibrate.stats import ActivationStats
from ..linalg import decompose
from ..linalg.flops import factoring_saves
from ..linalg.spectra import whitened_spectrum
from .plan import RankPlan
from .targets import dense_weight, layer_shapes

logger = logging.getLogger(__name__)

DEFAULT_GROUPS: dict[str, list[str]] = {
    "attention": [r".*(attn|attention).*"],
    "mlp": [r".*(mlp|ffn|feed_forward|intermediate|output\.dense|fc\d?).*"],
}

__all__ = ["DEFAULT_GROUPS", "search_evaluations", "search_ranks"]


def _assign_groups(names: Sequence[str], groups: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    assigned: dict[str, list[str]] = {g: [] for g in groups}
    for name in names:
        for group, patterns in groups.items():
            if isinstance(patterns, str):
                raise TypeError(f"groups[{group!r}] must be a list of regexes, got the string {patterns!r}")
            if any(re.fullmatch(p, name) for p in patterns):
                assigned[group].append(name)
                break
        else:
            assigned.setdefault("other", []).append(name)
    return {g: n for g, n in assigned.items() if n}


def search_evaluations(
    model: nn.Module,
    *,
    groups: Optional[Mapping[str, Sequence[str]]] = None,
    target_modules: Union[None, str, Sequence[str]] = None,
    max_steps: int = 8,
) -> int:
    """How many times :func:`search_ranks` calls ``eval_fn``: the dense baseline, ``max_steps`` per layer group,
    and the chosen configuration once more (one fewer when the baseline is given)."""
    grouped = _assign_groups(list(layer_shapes(model, target_modules)), groups or DEFAULT_GROUPS)
    return 2 + len(grouped) * max_steps


def search_ranks(
    model: nn.Module,
    stats: ActivationStats,
    eval_fn: Callable[[nn.Module], float],
    epsilon: float,
    *,
    groups: Optional[Mapping[str, Sequence[str]]] = None,
    target_modules: Union[None, str, Sequence[str]] = None,
    init: str = "projected",
    baseline: Optional[float] = None,
    higher_is_better: bool = False,
    relative: bool = True,
    split: str = "progressive",
    max_steps: int = 8,
    min_energy: float = 0.5,
    max_energy: float = 0.99999,
    damp: float = 1e-6,
    device: Optional[Union[str, torch.device]] = None,
    show_progress: bool = True,
    cache_bytes: int = 2 * 1024**3,
) -> RankPlan:
    """Lowest energy thresholds per layer group whose factorisation keeps the metric within ε of the dense model.

    For each group in turn (default :data:`DEFAULT_GROUPS`: attention q/k/v/o, then MLP up/gate/down;
    ``groups`` maps a group name to regexes of full layer names, unmatched layers form ``"other"``), one
    energy ``e`` is binary-searched on a log scale of ``1 − e`` between ``min_energy`` and ``max_energy``,
    with the groups already searched held at their chosen energies:

    * ``init="projected"``: every layer of the group becomes ``W' = P_T W P_S`` with ``e_S = e_T = e``
      (its utilized rank is the layer's rank);
    * ``init="whitened"``: every layer keeps the smallest rank holding ``e`` of its whitened output energy
      (:func:`whitened_spectrum`), with the whitened (truncation-aware) factors.

    A layer whose factorisation would not save (``r(m+d) ≥ md``) keeps its dense weight, as
    :class:`~nsn_peft.NSNModel` does. Candidates are evaluated by writing the low-rank product into the
    model's weights (same outputs as the factored layers) and calling ``eval_fn(model)``; the original
    weights are always restored (they are kept on the CPU meanwhile).

    Args:
        model: the dense model (not yet adapted).
        eval_fn: ``model -> float``, e.g. perplexity on validation text, or the mean zero-shot accuracy of
            lm-eval tasks on a validation subset (:func:`nsn_peft.evaluation.accuracy_metric`; then
            ``higher_is_better=True, relative=False``, and ``epsilon=0.01`` allows one point of accuracy).
        epsilon: allowed drop: ``(metric − baseline)/|baseline|`` (reversed when ``higher_is_better``;
            absolute difference when ``relative=False``).
        baseline: the dense metric, if already known (otherwise measured first).
        split: ``"progressive"`` lets the cumulative drop after the i-th of G groups reach ``ε·i/G`` (so the
            first group cannot spend the whole budget); ``"greedy"`` allows ε for every group.
        max_steps: bisection steps per group (each is one ``eval_fn`` call).
        min_energy / max_energy: search interval; the group stays dense when even ``max_energy`` fails.
        cache_bytes: memory for keeping each layer's energy-independent decomposition (eigenbases, or
            full-rank whitened factors) across the steps of its group's search, so a step costs one small SVD
            per layer instead of two eigendecompositions; layers beyond it are decomposed again each step.
            ``0`` disables the cache.

    Returns:
        A :class:`RankPlan` (``init`` as given) whose ``target`` holds ε, the baseline, the metric of the
        chosen configuration (measured once more at the end) and the energy of each group; ``history``
        lists every evaluation. ``target["metric"]`` respects ε whenever ``eval_fn`` is deterministic.
    """
    if init not in ("projected", "whitened"):
        raise ValueError(f"search_ranks init must be 'projected' or 'whitened', got {init!r}")
    if split not in ("progressive", "greedy"):
        raise ValueError(f"split must be 'progressive' or 'greedy', got {split!r}")
    if not isinstance(epsilon, (int, float)) or epsilon < 0:
        raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
    if not 0 < min_energy < max_energy < 1:
        raise ValueError(f"need 0 < min_energy < max_energy < 1, got {min_energy!r} and {max_energy!r}")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    if not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise ValueError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
    layers = layer_shapes(model, target_modules)
    stats.check_compatible({n: d for n, (_, _, d) in layers.items()})
    grouped = _assign_groups(list(layers), groups or DEFAULT_GROUPS)
    originals = {n: dense_weight(mod).detach().to("cpu", copy=True) for n, (mod, _, _) in layers.items()}
    spectra: dict[str, torch.Tensor] = {}
    ranks_at: dict[tuple[str, float], int] = {}

    def weight_of(name: str) -> torch.Tensor:
        module = layers[name][0]
        return originals[name].to(device if device is not None else module.weight.device)

    # Energy-independent decompositions of the group being searched, kept while they fit in cache_bytes.
    cache: dict[str, Any] = {}
    cached_bytes = 0

    def remember(name: str, value: Any, nbytes: int) -> Any:
        nonlocal cached_bytes
        if cached_bytes + nbytes <= cache_bytes:
            cache[name], cached_bytes = value, cached_bytes + nbytes
        return value

    def forget() -> None:
        nonlocal cached_bytes
        cache.clear()
        cached_bytes = 0

    def low_rank(name: str, energy: float) -> tuple[int, Optional[torch.Tensor]]:
        """(rank, W' or None when the layer stays dense) of one layer at ``energy``."""
        _, m, d = layers[name]
        weight = weight_of(name)
        if init == "projected":
            bases = cache.get(name)
            if bases is None:
                bases = decompose.projection_bases(weight, stats.gram(name))
                remember(name, bases, bases.nbytes())
            product, r = decompose.projected_weight(bases, weight, energy, energy)
            if not factoring_saves(m, d, r):
                product = None
        else:
            if name not in spectra:
                spectra[name] = whitened_spectrum(weight, stats.gram(name), damp).cpu()
            r = max(1, decompose.energy_rank(spectra[name], energy))
            product = None
            if factoring_saves(m, d, r):
                # Whitened factors are nested: rank r is a prefix of the full-rank ones.
                factors = cache.get(name)
                if factors is None:
                    factors = decompose.whitened_factors(weight, stats.gram(name), None, damp=damp)
                    remember(name, factors, sum(t.numel() * t.element_size() for t in factors))
                b, a = factors
                product = b[:, :r] @ a[:r]
        ranks_at[(name, energy)] = r
        return r, product

    @torch.no_grad()
    def write(name: str, new: torch.Tensor) -> None:
        module = layers[name][0]
        module.weight.copy_((new.T if isinstance(module, Conv1D) else new).to(module.weight))

    def apply_group(names: Sequence[str], energy: Optional[float]) -> None:
        for name in names:
            product = None if energy is None else low_rank(name, energy)[1]
            write(name, originals[name] if product is None else product)

    def drop(metric: float) -> float:
        delta = (reference - metric) if higher_is_better else (metric - reference)
        if not relative:
            return delta
        return delta / (abs(reference) if reference != 0 else 1.0)

    history: list[dict[str, Any]] = []
    chosen: dict[str, float] = {}
    lo_nines, hi_nines = -math.log10(1 - min_energy), -math.log10(1 - max_energy)
    # Every eval_fn call counts (the baseline and the final check too), so the bar's time left is right from the start.
    progress = tqdm(
        total=len(grouped) * max_steps + 1 + (baseline is None),
        desc="Rank search",
        unit="eval",
        disable=not show_progress,
    )
    try:
        reference = float(eval_fn(model)) if baseline is None else float(baseline)
        if baseline is None:
            progress.update(1)
        if not math.isfinite(reference):
            raise ValueError(f"The baseline metric is {reference}; eval_fn must return a finite number")
        history.append({"group": None, "energy": 1.0, "metric": reference})
        for index, (group, names) in enumerate(grouped.items(), 1):
            allowed = epsilon * index / len(grouped) if split == "progressive" else epsilon
            lo, hi = lo_nines, hi_nines  # invariant: hi is acceptable (near-lossless), lo may not be
            best = None
            for _ in range(max_steps):
                mid = (lo + hi) / 2
                energy = 1 - 10 ** (-mid)
                apply_group(names, energy)
                metric = float(eval_fn(model))
                ok = math.isfinite(metric) and drop(metric) <= allowed
                history.append(
                    {"group": group, "energy": energy, "metric": metric, "accepted": ok, "allowed_drop": allowed}
                )
                logger.info(
                    "search %s: energy %.6f -> metric %.6g (%s)", group, energy, metric, "ok" if ok else "too lossy"
                )
                progress.update(1)
                if ok:
                    best, hi = energy, mid
                else:
                    lo = mid
            apply_group(names, best)
            forget()  # the next group's layers take the cache
            if best is not None:
                chosen.update(dict.fromkeys(names, best))
        final_metric = float(eval_fn(model))
        progress.update(1)
        history.append({"group": "final", "metric": final_metric})
    finally:
        progress.close()
        for name in layers:
            write(name, originals[name])
    ranks, dense, energies = {}, [], {}
    for name, (_, m, d) in layers.items():
        energy = chosen.get(name)
        r = ranks_at.get((name, energy)) if energy is not None else None
        if r is None or not factoring_saves(m, d, r):
            dense.append(name)
            continue
        ranks[name] = r
        if init == "projected":
            energies[name] = [energy, energy]
    group_energies = {g: chosen.get(n[0], 1.0) for g, n in grouped.items()}
    logger.info(
        "Rank search: metric %.6g vs baseline %.6g (ε=%g); energies %s",
        final_metric,
        reference,
        epsilon,
        group_energies,
    )
    return RankPlan(
        ranks,
        sorted(dense),
        init,
        energies,
        target={
            "mode": "epsilon",
            "epsilon": epsilon,
            "relative": relative,
            "baseline": reference,
            "metric": final_metric,
            "higher_is_better": higher_is_better,
            "split": split,
            "group_energies": group_energies,
            "groups": {g: len(n) for g, n in grouped.items()},
        },
        history=history,
        shapes={n: [m, d] for n, (_, m, d) in layers.items()},
    )
