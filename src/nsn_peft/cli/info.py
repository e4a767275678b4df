"""``nsn-peft info``: layers, ranks and FLOPs of a saved NSN adapter, read without loading the base model.

Everything comes from ``adapter_config.json`` and the tensor *shapes* in the safetensors header
(``nsn_A``: R×d, ``nsn_B``: m×R), so the command is instant and needs neither the base model nor torch
tensors in memory. FLOPs are those of the factored layers (``2·r·(m+d)`` per token against ``2·m·d``);
layers the adapter does not touch (embeddings, the output head) are unknown here and not counted.
"""

from __future__ import annotations

import argparse
import json
import struct
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from ..hub import is_compressed_folder
from .inputs import read_adapter_config
from .options import FULL, UsageError, add_common_options, new_command, rank_list
from .output import CommandResult, format_table

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_HEADER_LIMIT = 100 * 1024 * 1024


def register(subparsers: Any) -> dict[str, argparse.ArgumentParser]:
    parser = new_command(
        subparsers,
        "info",
        summary="Show the layers, ranks and FLOPs table of a saved NSN adapter.",
        description=(
            "Print the factored layers of an adapter folder (shapes, max and active ranks, parameters) and the "
            "FLOPs of the factored layers at a few ranks, relative to the dense layers. Reads adapter_config.json "
            "and the safetensors header only: the base model is not loaded. A compressed model folder (from "
            "`compress`) is summarised from its config.json and weights header."
        ),
        examples=["--adapter ./nsn-adapter", "--adapter ./nsn-adapter --ranks 64,128,full --layers --json"],
    )
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="Adapter folder, or a compressed model folder from `compress` (required).",
    )
    parser.add_argument(
        "--ranks",
        type=rank_list,
        default=None,
        metavar="LIST",
        help="Ranks of the FLOPs table (default: a few ranks of the grid).",
    )
    parser.add_argument("--layers", action=argparse.BooleanOptionalAction, default=False, help="List every layer.")
    add_common_options(parser)
    parser.set_defaults(func=run)
    return {"info": parser}


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: ``{name: {"dtype", "shape", "data_offsets"}}``."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > _HEADER_LIMIT:
            raise ValueError(f"{path} is not a safetensors file (header size {size})")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _module_name(key: str) -> tuple[str, str]:
    """``base_model.model.model.layers.0.q_proj.nsn_A[.default]`` -> (``model.layers.0.q_proj``, ``A``)."""
    from ..naming import canonical_module_name

    prefix, _, rest = key.rpartition(".nsn_")
    return canonical_module_name(prefix), rest.split(".")[0]


def adapter_layers(folder: Path) -> dict[str, dict[str, int]]:
    """``{module: {"out": m, "in": d, "max_rank": R}}`` from the adapter's safetensors header."""
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise UsageError(
                f"{folder} stores its weights as adapter_model.bin; only safetensors adapters can be inspected"
            )
        raise UsageError(f"{folder} has no {ADAPTER_WEIGHTS}")
    layers: dict[str, dict[str, int]] = {}
    for key, entry in read_safetensors_header(path).items():
        if ".nsn_" not in key:
            continue
        name, factor = _module_name(key)
        shape = entry["shape"]
        layer = layers.setdefault(name, {})
        if factor == "A":
            layer["max_rank"], layer["in"] = int(shape[0]), int(shape[1])
        elif factor == "B":
            layer["out"], layer["max_rank"] = int(shape[0]), int(shape[1])
    incomplete = [n for n, v in layers.items() if not {"in", "out", "max_rank"} <= set(v)]
    if incomplete:
        raise ValueError(f"{path}: layer '{incomplete[0]}' lacks its nsn_A or nsn_B factor")
    return dict(sorted(layers.items(), key=lambda kv: _natural_key(kv[0])))


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _active_ranks(layers: Mapping[str, Mapping[str, int]], active: Any) -> dict[str, int]:
    if active is None:
        return {n: v["max_rank"] for n, v in layers.items()}
    if isinstance(active, Mapping):
        from ..naming import lookup_pattern

        out = {}
        for n, v in layers.items():
            key = lookup_pattern(active, n)
            out[n] = min(int(active[key]), v["max_rank"]) if key is not None else v["max_rank"]
        return out
    return {n: min(int(active), v["max_rank"]) for n, v in layers.items()}


def _table_ranks(requested: Optional[list], top: int, granularity: int) -> list[int]:
    from ..linalg.flops import rank_grid

    if requested:
        return [top if r == FULL else int(r) for r in requested]
    grid = rank_grid(top, granularity)
    picks = {grid[0], grid[len(grid) // 4], grid[len(grid) // 2], grid[(3 * len(grid)) // 4], grid[-1]}
    return sorted(picks)


def _layer_report(
    layers: Mapping[str, Mapping[str, int]], active: Mapping[str, int], requested: Optional[list], granularity: int
) -> dict[str, Any]:
    """Totals, FLOPs table and per-layer rows shared by adapters and compressed folders."""
    from ..linalg.flops import dense_flops, factored_flops

    top = max(v["max_rank"] for v in layers.values())
    dense = sum(dense_flops(v["out"], v["in"]) for v in layers.values())
    flops_rows = []
    for r in _table_ranks(requested, top, granularity):
        flops = sum(factored_flops(v["out"], v["in"], min(r, v["max_rank"])) for v in layers.values())
        flops_rows.append({"rank": r, "flops_per_token": flops, "flops_fraction": flops / dense})
    at_active = sum(factored_flops(v["out"], v["in"], active[n]) for n, v in layers.items())
    return {
        "num_layers": len(layers),
        "factor_params": sum(v["max_rank"] * (v["out"] + v["in"]) for v in layers.values()),
        "dense_params": sum(v["out"] * v["in"] for v in layers.values()),
        "dense_flops_per_token": dense,
        "active_flops_per_token": at_active,
        "active_flops_fraction": at_active / dense,
        "max_rank_counts": {str(k): c for k, c in sorted(Counter(v["max_rank"] for v in layers.values()).items())},
        "flops_table": flops_rows,
        "layers": [
            {
                "name": n,
                "out_features": v["out"],
                "in_features": v["in"],
                "max_rank": v["max_rank"],
                "active_rank": active[n],
                "params": v["max_rank"] * (v["out"] + v["in"]),
                "dense_params": v["out"] * v["in"],
                "flops_fraction": factored_flops(v["out"], v["in"], active[n]) / dense_flops(v["out"], v["in"]),
            }
            for n, v in layers.items()
        ],
    }


def _report_lines(data: Mapping[str, Any], show_layers: bool, flops_table: bool = True) -> list[str]:
    lines = ["", "Max ranks:", format_table(list(data["max_rank_counts"].items()), ["max rank", "layers"], align="rr")]
    if flops_table:
        lines += [
            "",
            "FLOPs of the factored layers (2r(m+d) per token vs 2md dense):",
            format_table(
                [(r["rank"], r["flops_per_token"], round(r["flops_fraction"], 4)) for r in data["flops_table"]],
                ["rank", "FLOPs/token", "vs dense"],
            ),
        ]
    if show_layers:
        lines += [
            "",
            format_table(
                [
                    (
                        r["name"],
                        r["out_features"],
                        r["in_features"],
                        r["max_rank"],
                        r["active_rank"],
                        round(r["flops_fraction"], 4),
                    )
                    for r in data["layers"]
                ],
                ["layer", "out", "in", "max rank", "active", "FLOPs vs dense"],
            ),
        ]
    return lines


def compressed_info(folder: Path, args: argparse.Namespace) -> CommandResult:
    """The same report for a folder written by ``nsn-peft compress`` (ranks are fixed there)."""
    from ..export.compressed import describe_export

    meta = describe_export(folder)
    layers = {
        n: {"out": v["out"], "in": v["in"], "max_rank": v["max_rank"]}
        for n, v in sorted(meta["layers"].items(), key=lambda kv: _natural_key(kv[0]))
    }
    if not layers:
        raise ValueError(f"{folder} lists no factored layer")
    active = {n: meta["layers"][n]["rank"] for n in layers}
    report = _layer_report(layers, active, args.ranks, 64)
    data = {
        "path": str(folder),
        "kind": "compressed",
        "architecture": meta.get("architecture"),
        "dtype": meta.get("dtype"),
        "budgets": sorted(float(b) for b in meta.get("budget_plans") or {}),
        **report,
    }
    lines = [
        f"Compressed model {folder}",
        f"  architecture: {data['architecture']}; dtype: {data['dtype']}",
        f"  factored layers: {report['num_layers']}; factor params: {report['factor_params']:,} vs dense "
        f"{report['dense_params']:,} ({report['factor_params'] / report['dense_params']:.3f})",
        f"  FLOPs/token of the factored layers: {report['active_flops_per_token']:,} "
        f"({report['active_flops_fraction']:.3f} of dense)",
    ]
    return CommandResult(data, "\n".join(lines + _report_lines(data, args.layers, flops_table=False)))


def run(args: argparse.Namespace) -> CommandResult:
    if not args.adapter:
        raise UsageError("the following arguments are required: --adapter")
    if is_compressed_folder(args.adapter):
        return compressed_info(Path(args.adapter), args)
    config = read_adapter_config(args.adapter)
    folder = Path(args.adapter)
    layers = adapter_layers(folder)
    if not layers:
        raise ValueError(f"{folder}/{ADAPTER_WEIGHTS} holds no NSN factors")
    active = _active_ranks(layers, config.get("active_rank"))
    granularity = int(config.get("rank_granularity") or 64)
    report = _layer_report(layers, active, args.ranks, granularity)
    data = {
        "adapter": str(folder),
        "kind": "adapter",
        "base_model": config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
        "init": config.get("init"),
        "max_rank": config.get("max_rank"),
        "rank_granularity": granularity,
        "active_rank": config.get("active_rank"),
        "kept_dense": config.get("kept_dense") or [],
        **report,
    }
    lines = [
        f"NSN adapter {folder}",
        f"  base model: {data['base_model']}",
        f"  task: {data['task_type']}; init: {data['init']}; max rank (config): {data['max_rank'] or 'full'}; "
        f"granularity: {granularity}",
        f"  active rank: {data['active_rank'] if data['active_rank'] is not None else 'max'}",
        f"  factored layers: {report['num_layers']}; factor params: {report['factor_params']:,} vs dense "
        f"{report['dense_params']:,} ({report['factor_params'] / report['dense_params']:.3f})",
        f"  FLOPs/token of factored layers at the active rank: {report['active_flops_per_token']:,} "
        f"({report['active_flops_fraction']:.3f} of dense)",
    ]
    if data["kept_dense"]:
        lines.append(f"  kept dense: {len(data['kept_dense'])} layer(s)")
    return CommandResult(data, "\n".join(lines + _report_lines(data, args.layers)))
