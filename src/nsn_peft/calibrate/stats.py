"""``ActivationStats``: per-layer input Gram matrices ``XᵀX`` gathered on calibration data.

Stored as one safetensors file (the matrices) plus ``stats.json`` (model id, layer names, token counts,
dtype) — no pickle. Matrices are float64 sums: they add up millions of outer products of activations
with outlier features of magnitude ~1e3, where float32 accumulation loses the small directions that
whitening needs.
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
from ..naming import canonical_module_name

STATS_FILE = "activation_stats.safetensors"
META_FILE = "stats.json"
FORMAT_VERSION = 1
# Where `nsn-peft calibrate --gradients` puts output-gradient statistics inside an activation-stats folder.
GRADIENT_STATS_SUBDIR = "output_gradients"

__all__ = ["ActivationStats"]




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
            hint = ("collect them with nsn_peft.collect_activation_stats (output-gradient statistics go to gradient_stats=)"
                    if kind == "activation" else "collect them with nsn_peft.collect_gradient_stats")
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
            problems.append(f"missing layers {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if wrong:
            problems.append(f"wrong shapes {wrong[:5]}")
        present = [canonical_module_name(n) for n in shapes if canonical_module_name(n) in self.grams]
        empty = [n for n in present if self.token_counts[n] <= 0]
        if empty:
            problems.append(f"layers {empty[:5]} were measured over 0 tokens (their statistics say nothing; "
                            "calibrate on data that reaches them)")
        broken = [n for n in present if n not in empty and not bool(torch.isfinite(self.grams[n]).all())]
        if broken:
            problems.append(f"layers {broken[:5]} hold NaN/Inf values (the model overflowed on the calibration "
                            "data, or the file is damaged)")
        if problems:
            origin = f" (model '{self.model_id}')" if self.model_id else ""
            label = "Activation" if kind == "activation" else "Output-gradient"
            raise ValueError(f"{label} statistics from {source}{origin} do not match this model: " + "; ".join(problems))

    # -- merging across processes / runs -------------------------------------------------------------
    def merge(self, other: ActivationStats) -> ActivationStats:
        grams = dict(self.grams)
        counts = dict(self.token_counts)
        for name, gram in other.grams.items():
            if name in grams:
                grams[name] = grams[name] + gram.to(grams[name])
                counts[name] += other.token_counts[name]
            else:
                grams[name], counts[name] = gram, other.token_counts[name]
        return ActivationStats(grams, counts, self.model_id or other.model_id, {**other.extra, **self.extra})

    def to(self, device: str | torch.device) -> ActivationStats:
        return ActivationStats({k: v.to(device) for k, v in self.grams.items()}, dict(self.token_counts), self.model_id, dict(self.extra))

    # -- persistence ------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``activation_stats.safetensors`` + ``stats.json`` into ``directory`` as one transaction.

        Other files of an existing ``directory`` (e.g. the output-gradient statistics that ``nsn-peft calibrate
        --gradients`` keeps in a subfolder) are left as they are; a file at ``directory`` is an error.
        """
        directory = check_folder_destination(directory, "statistics folder")
        meta = {
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "dtype": str(next(iter(self.grams.values())).dtype).removeprefix("torch.") if self.grams else None,
            "layers": {name: {"in_features": int(g.shape[0]), "tokens": int(self.token_counts[name])} for name, g in self.grams.items()},
            "extra": self.extra,
        }
        with atomic_directory(directory) as tmp:
            write_safetensors(tmp / STATS_FILE, self.grams, metadata={"format": "nsn-peft-activation-stats"})
            write_json(tmp / META_FILE, meta)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu", layers: Optional[Iterable[str]] = None) -> ActivationStats:
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
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path} has format_version {meta.get('format_version')!r}; this version reads {FORMAT_VERSION}")
        wanted = set(canonical_module_name(n) for n in layers) if layers is not None else None
        grams, counts = {}, {}
        with safe_open(str(tensor_path), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            for name, info in layer_meta.items():
                if wanted is not None and name not in wanted:
                    continue
                if name not in keys:
                    raise ValueError(f"{tensor_path} lacks the matrix of layer '{name}' listed in {META_FILE}")
                gram = f.get_tensor(name)
                if tuple(gram.shape) != (info["in_features"], info["in_features"]):
                    raise ValueError(f"{tensor_path}: layer '{name}' has shape {tuple(gram.shape)}, metadata says {info['in_features']}")
                grams[name], counts[name] = gram, int(info["tokens"])
        stats = cls(grams, counts, meta.get("model_id"), meta.get("extra", {}))
        stats._loaded_from = str(directory)
        return stats
