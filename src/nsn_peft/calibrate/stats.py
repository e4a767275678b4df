"""``ActivationStats``: per-layer input Gram matrices ``XᵀX`` gathered on calibration data.

Stored as one safetensors file (the matrices) plus ``stats.json`` (model id, layer names, token counts,
dtype) — no pickle. The sums are accumulated in float64 (they add up millions of outer products of
activations with outlier features of magnitude ~1e3, where float32 *accumulation* loses the small directions
whitening needs), but stored compactly:

* each distinct matrix once: layers that read the same input (q/k/v, gate/up) share one matrix, and
  ``stats.json`` maps the others to it (``aliases``); in memory they share one tensor too;
* one triangle of each (the matrices are symmetric);
* float32 (:data:`STORAGE_DTYPE`): rounding the finished sums changes compression results by far less than the
  calibration data does (measured on SmolLM2-135M, ``benchmarks/bench_stats_precision.py``).

Folders of format version 1 (every layer's float64 matrix in full) still load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from ..io import (
    atomic_directory,
    check_folder_destination,
    check_safetensors,
    finish_interrupted_save,
    write_json,
    write_safetensors,
)
from ..linalg.gram import pack_symmetric, unpack_symmetric
from ..naming import canonical_module_name

STATS_FILE = "activation_stats.safetensors"
META_FILE = "stats.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
STORAGE_DTYPE = torch.float32
# Where `nsn-peft calibrate --gradients` puts output-gradient statistics inside an activation-stats folder.
GRADIENT_STATS_SUBDIR = "output_gradients"

__all__ = ["ActivationStats"]


def _distinct_matrices(
    grams: Mapping[str, torch.Tensor], counts: Mapping[str, int]
) -> tuple[list[str], dict[str, str]]:
    """``(stored, aliases)``: the first layer of each distinct matrix, and ``{other layer: stored layer}``.

    Two layers share a matrix when they hold the same tensor object (calibration shares the accumulator of
    layers reading one input) or equal values over the same number of tokens.
    """
    stored: list[str] = []
    aliases: dict[str, str] = {}
    by_identity: dict[int, str] = {}
    by_key: dict[tuple, list[str]] = {}
    for name, gram in grams.items():
        owner = by_identity.get(id(gram))
        if owner is None:
            key = (tuple(gram.shape), gram.dtype, counts[name], float(gram.diagonal().sum()), float(gram[0].sum()))
            owner = next((other for other in by_key.get(key, []) if torch.equal(grams[other], gram)), None)
            if owner is None:
                by_key.setdefault(key, []).append(name)
        if owner is None:
            stored.append(name)
            by_identity[id(gram)] = name
        else:
            aliases[name] = owner
    return stored, aliases


@dataclass
class ActivationStats:
    """Input second moments of linear layers: ``grams[name]`` is ``Σ xxᵀ`` (d×d) over ``token_counts[name]`` tokens."""

    grams: dict[str, torch.Tensor]
    token_counts: dict[str, int]
    model_id: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = set(self.grams) ^ set(self.token_counts)
        if missing:
            raise ValueError(f"grams and token_counts disagree on layers: {sorted(missing)[:5]}")
        for name, gram in self.grams.items():
            if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
                raise ValueError(f"Gram matrix of '{name}' must be square, got shape {tuple(gram.shape)}")

    @property
    def layer_names(self) -> list[str]:
        return list(self.grams)

    @property
    def kind(self) -> str:
        """``"activation"`` (input Grams ``Σ xxᵀ``) or ``"output_gradient"`` (``Σ ggᵀ`` of the loss gradients)."""
        return self.extra.get("kind", "activation")

    @property
    def num_tokens(self) -> int:
        return max(self.token_counts.values(), default=0)

    def __contains__(self, name: str) -> bool:
        return canonical_module_name(name) in self.grams

    def gram(self, name: str, normalized: bool = True) -> torch.Tensor:
        """``XᵀX`` of layer ``name`` (divided by its token count when ``normalized``)."""
        key = canonical_module_name(name)
        if key not in self.grams:
            raise KeyError(
                f"No activation statistics for layer '{key}' (stats cover {len(self.grams)} layers, e.g. "
                f"{self.layer_names[:3]}). Collect them with nsn_peft.collect_activation_stats on this model."
            )
        gram = self.grams[key]
        return gram / max(self.token_counts[key], 1) if normalized else gram

    def check_compatible(self, shapes: Mapping[str, int], source: str = "stats", kind: str = "activation") -> None:
        """Raise ``ValueError`` unless these are ``kind`` statistics covering every layer of ``shapes``.

        ``shapes`` maps layer names to the matrix size the statistics must have: ``in_features`` for activation
        statistics, ``out_features`` for output-gradient statistics. The error names missing layers and wrong
        shapes; statistics of the other kind (they look alike) are refused outright.
        """
        if source == "stats" and getattr(self, "_loaded_from", None):
            source = self._loaded_from  # name the folder the statistics came from
        if self.kind != kind:
            hint = (
                "collect them with nsn_peft.collect_activation_stats (output-gradient statistics go to gradient_stats=)"
                if kind == "activation"
                else "collect them with nsn_peft.collect_gradient_stats"
            )
            raise ValueError(f"{source} holds {self.kind} statistics, not {kind} statistics; {hint}")
        feature = "in_features" if kind == "activation" else "out_features"
        missing = [n for n in shapes if canonical_module_name(n) not in self.grams]
        wrong = [
            f"{n} (stats {tuple(self.grams[canonical_module_name(n)].shape)}, model {feature} {d})"
            for n, d in shapes.items()
            if canonical_module_name(n) in self.grams and self.grams[canonical_module_name(n)].shape[0] != d
        ]
        problems = []
        if missing:
            problems.append(
                f"missing layers {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        if wrong:
            problems.append(f"wrong shapes {wrong[:5]}")
        present = [canonical_module_name(n) for n in shapes if canonical_module_name(n) in self.grams]
        empty = [n for n in present if self.token_counts[n] <= 0]
        if empty:
            problems.append(
                f"layers {empty[:5]} were measured over 0 tokens (their statistics say nothing; "
                "calibrate on data that reaches them)"
            )
        broken = [n for n in present if n not in empty and not bool(torch.isfinite(self.grams[n]).all())]
        if broken:
            problems.append(
                f"layers {broken[:5]} hold NaN/Inf values (the model overflowed on the calibration "
                "data, or the file is damaged)"
            )
        if problems:
            origin = f" (model '{self.model_id}')" if self.model_id else ""
            label = "Activation" if kind == "activation" else "Output-gradient"
            raise ValueError(
                f"{label} statistics from {source}{origin} do not match this model: " + "; ".join(problems)
            )

    # -- merging across processes / runs -------------------------------------------------------------
    def merge(self, other: ActivationStats) -> ActivationStats:
        grams = dict(self.grams)
        counts = dict(self.token_counts)
        sums: dict[tuple[int, int], torch.Tensor] = {}  # layers sharing a matrix in both keep sharing its sum
        for name, gram in other.grams.items():
            if name in grams:
                key = (id(grams[name]), id(gram))
                if key not in sums:
                    sums[key] = grams[name] + gram.to(grams[name])
                grams[name] = sums[key]
                counts[name] += other.token_counts[name]
            else:
                grams[name], counts[name] = gram, other.token_counts[name]
        return ActivationStats(grams, counts, self.model_id or other.model_id, {**other.extra, **self.extra})

    def to(self, device: str | torch.device) -> ActivationStats:
        moved: dict[int, torch.Tensor] = {}  # shared matrices stay shared
        grams = {k: moved.setdefault(id(v), v.to(device)) for k, v in self.grams.items()}
        return ActivationStats(grams, dict(self.token_counts), self.model_id, dict(self.extra))

    # -- persistence ------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, dtype: torch.dtype = STORAGE_DTYPE) -> Path:
        """Write ``activation_stats.safetensors`` + ``stats.json`` into ``directory`` as one transaction.

        Each distinct matrix is stored once (``aliases`` in ``stats.json`` name the layers that share it), as
        its upper triangle, in ``dtype`` (default float32; ``torch.float64`` keeps the sums bit for bit).
        Other files of an existing ``directory`` (e.g. the output-gradient statistics that ``nsn-peft calibrate
        --gradients`` keeps in a subfolder) are left as they are; a file at ``directory`` is an error.
        """
        directory = check_folder_destination(directory, "statistics folder")
        stored, aliases = _distinct_matrices(self.grams, self.token_counts)
        tensors = {name: pack_symmetric(self.grams[name].to(dtype)) for name in stored}
        meta = {
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "dtype": str(dtype).removeprefix("torch."),
            "layout": "upper_triangle",
            "layers": {
                name: {"in_features": int(g.shape[0]), "tokens": int(self.token_counts[name])}
                for name, g in self.grams.items()
            },
            "aliases": aliases,
            "extra": self.extra,
        }
        with atomic_directory(directory) as tmp:
            write_safetensors(tmp / STATS_FILE, tensors, metadata={"format": "nsn-peft-activation-stats"})
            write_json(tmp / META_FILE, meta)
        return directory

    @classmethod
    def load(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu", layers: Optional[Iterable[str]] = None
    ) -> ActivationStats:
        """Load statistics saved by :meth:`save`; ``layers`` restricts which matrices are read."""
        directory = Path(directory)
        finish_interrupted_save(directory)
        meta_path, tensor_path = directory / META_FILE, directory / STATS_FILE
        if not meta_path.is_file() or not tensor_path.is_file():
            raise FileNotFoundError(
                f"'{directory}' is not an activation-stats folder (expected {META_FILE} and {STATS_FILE}); "
                "create one with nsn_peft.collect_activation_stats(...).save(path) or `nsn-peft calibrate`."
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            layer_meta = meta["layers"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"Corrupt {meta_path}: {err}") from err
        check_safetensors(tensor_path)  # a truncated file is named here, not deep inside safetensors
        version = meta.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"{meta_path} has format_version {version!r}; this version reads {list(READABLE_VERSIONS)}"
            )
        aliases = meta.get("aliases") or {}
        packed = meta.get("layout") == "upper_triangle"
        wanted = set(canonical_module_name(n) for n in layers) if layers is not None else None
        grams, counts = {}, {}
        read: dict[str, torch.Tensor] = {}  # stored matrices, read once however many layers share them
        with safe_open(str(tensor_path), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            for name, info in layer_meta.items():
                if wanted is not None and name not in wanted:
                    continue
                key = aliases.get(name, name)
                if key not in keys:
                    raise ValueError(f"{tensor_path} lacks the matrix of layer '{key}' listed in {META_FILE}")
                size = int(info["in_features"])
                if key not in read:
                    tensor = f.get_tensor(key)
                    try:
                        read[key] = unpack_symmetric(tensor, size) if packed else tensor
                    except ValueError as err:
                        raise ValueError(f"{tensor_path}: layer '{key}': {err}") from None
                gram = read[key]
                if tuple(gram.shape) != (size, size):
                    raise ValueError(
                        f"{tensor_path}: layer '{name}' has shape {tuple(gram.shape)}, metadata says {size}"
                    )
                grams[name], counts[name] = gram, int(info["tokens"])
        stats = cls(grams, counts, meta.get("model_id"), meta.get("extra", {}))
        stats._loaded_from = str(directory)
        return stats
