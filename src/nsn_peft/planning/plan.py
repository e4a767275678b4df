"""``RankPlan``: per-layer ranks, layers left dense, and how they were chosen (JSON, validated on load).

Every planner (:mod:`.allocate`, :mod:`.search`) returns one; :class:`~nsn_peft.NSNConfig` consumes it::

    plan = allocate_ranks_for_budget(model, stats, 0.5)
    model = get_peft_model(model, NSNConfig(stats=stats, **plan.to_config_kwargs()))
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from ..io import write_json
from ..tuner.rank_spec import RankSpec

PLAN_FORMAT = "nsn-peft-rank-plan"
PLAN_VERSION = 1

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "RankPlan"]


@dataclass
class RankPlan:
    """Per-layer ranks, layers left dense, and how they were chosen; consumed by :class:`~nsn_peft.NSNConfig`.

    Attributes:
        ranks: ``{layer name: rank}`` of the factored layers (plain base-model names).
        kept_dense: layers of the plan left dense (factoring them would not save, or the search kept them).
        init: the initialisation the ranks were chosen for (``"whitened"``, ``"projected"`` or ``"svd"``).
        energies: ``{layer: [energy_input, energy_output]}`` for ``init="projected"`` plans.
        target: how the plan was made (mode, ε or budget, baseline and final metric, achieved fraction...).
        history: every metric evaluation of a search, in order.
        shapes: ``{layer: [out_features, in_features]}`` of every planned layer (used for validation and
            parameter accounting; optional).
    """

    ranks: dict[str, int]
    kept_dense: list[str] = field(default_factory=list)
    init: str = "whitened"
    energies: dict[str, list[float]] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.init not in ("svd", "whitened", "projected"):
            raise ValueError(f"RankPlan.init must be 'svd', 'whitened' or 'projected', got {self.init!r}")
        if not isinstance(self.ranks, dict):
            raise ValueError(f"RankPlan.ranks must be a mapping {{layer: rank}}, got {type(self.ranks).__name__}")
        for name, rank in self.ranks.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ValueError(f"RankPlan.ranks[{name!r}] must be a positive int, got {rank!r}")
        if not isinstance(self.kept_dense, list) or not all(isinstance(n, str) for n in self.kept_dense):
            raise ValueError(f"RankPlan.kept_dense must be a list of layer names, got {self.kept_dense!r}")
        if not isinstance(self.energies, dict):
            raise ValueError(
                f"RankPlan.energies must be a mapping {{layer: [e_in, e_out]}}, got {type(self.energies).__name__}"
            )
        for name, pair in self.energies.items():
            if not (
                isinstance(pair, (list, tuple))
                and len(pair) == 2
                and all(isinstance(e, (int, float)) and not isinstance(e, bool) and 0 < e <= 1 for e in pair)
            ):
                raise ValueError(f"RankPlan.energies[{name!r}] must be [e_in, e_out] in (0, 1], got {pair!r}")
        if self.energies and self.init != "projected":
            raise ValueError(f"RankPlan.energies is only meaningful with init='projected', not {self.init!r}")
        if not isinstance(self.target, dict):
            raise ValueError(f"RankPlan.target must be an object, got {type(self.target).__name__}")
        if not isinstance(self.history, list):
            raise ValueError(f"RankPlan.history must be a list, got {type(self.history).__name__}")
        if not isinstance(self.shapes, dict):
            raise ValueError(
                f"RankPlan.shapes must be a mapping {{layer: [out, in]}}, got {type(self.shapes).__name__}"
            )
        for name, shape in self.shapes.items():
            if not (
                isinstance(shape, (list, tuple))
                and len(shape) == 2
                and all(isinstance(v, int) and v > 0 for v in shape)
            ):
                raise ValueError(f"RankPlan.shapes[{name!r}] must be [out_features, in_features], got {shape!r}")
            if name in self.ranks and self.ranks[name] > min(shape):
                raise ValueError(
                    f"RankPlan.ranks[{name!r}] = {self.ranks[name]} exceeds min{tuple(shape)} of the layer"
                )
        overlap = set(self.ranks) & set(self.kept_dense)
        if overlap:
            raise ValueError(f"RankPlan lists layers both factored and dense: {sorted(overlap)[:5]}")

    def to_config_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for :class:`~nsn_peft.NSNConfig` reproducing this plan.

        Returns ``init``, ``target_modules`` (the factored layers, by full name), ``rank_pattern`` and, when
        relevant, ``energy_pattern`` (projected plans) and ``exclude_modules`` (layers kept dense).
        ``overrides`` are merged in last, so ``NSNConfig(**plan.to_config_kwargs(stats=stats))`` works
        (passing ``init=`` both directly and through the plan would be a duplicate keyword).
        """
        if not self.ranks:
            raise ValueError("RankPlan factors no layer (every layer is kept dense); nothing to adapt")
        kwargs: dict[str, Any] = {
            "init": self.init,
            "target_modules": sorted(self.ranks),
            "rank_pattern": {re.escape(n): r for n, r in self.ranks.items()},
        }
        if self.energies:
            kwargs["energy_pattern"] = {re.escape(n): list(e) for n, e in self.energies.items()}
        if self.kept_dense:
            kwargs["exclude_modules"] = sorted(self.kept_dense)
        kwargs.update(overrides)
        return kwargs

    def to_rank_spec(self) -> RankSpec:
        """The plan's ranks as an operating point: ``model.set_rank(plan.to_rank_spec())`` runs a model whose
        max ranks are higher at this plan's ranks (the layers it does not factor keep theirs)."""
        if not self.ranks:
            raise ValueError("RankPlan factors no layer (every layer is kept dense); it names no operating point")
        return RankSpec.layers(self.ranks)

    def parameter_fraction(self, shapes: Optional[Mapping[str, tuple[int, int]]] = None) -> float:
        """Parameters of the planned layers (factored or dense) over their dense parameters.

        ``shapes`` (``{layer: (out_features, in_features)}``) defaults to the plan's own ``shapes``.
        """
        shapes = shapes if shapes is not None else {n: tuple(s) for n, s in self.shapes.items()}
        if not shapes:
            raise ValueError("RankPlan.parameter_fraction needs layer shapes (this plan records none)")
        dense = sum(m * d for m, d in shapes.values())
        planned = sum(min(self.ranks[n] * (m + d), m * d) if n in self.ranks else m * d for n, (m, d) in shapes.items())
        return planned / dense

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the plan as JSON (atomically: a crash never leaves a half-written file)."""
        data = {"format": PLAN_FORMAT, "version": PLAN_VERSION, **asdict(self)}
        write_json(path, data)
        return Path(path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> RankPlan:
        """Read and validate a plan written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: invalid JSON, another format/version, unknown fields, or a bad value (the message
                names the file and the field, e.g. ``ranks['model.layers.0.mlp.up_proj']``).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Rank plan not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f'{path} is not an nsn-peft rank plan (missing "format": "{PLAN_FORMAT}")')
        if data.get("version") != PLAN_VERSION:
            raise ValueError(
                f"{path}: rank plan version {data.get('version')!r} is not supported (expected {PLAN_VERSION})"
            )
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"format", "version"}
        if unknown:
            raise ValueError(f"{path}: unknown rank-plan fields {sorted(unknown)}")
        if not isinstance(data.get("ranks"), dict):
            raise ValueError(f"{path}: field 'ranks' must be an object {{layer: rank}}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None
