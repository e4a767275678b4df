"""Storing activation statistics in float32 instead of float64: effect on compression, and folder sizes.

Calibrates SmolLM2-135M on the Python tutorial (activation and output-gradient statistics, accumulated in
float64 as always), saves them in both storage dtypes (the compact format: shared inputs once, one triangle)
and in the first format (every layer's float64 matrix in full), reloads each, and compares what they produce:

* ``whitened``: MLP layers factored with whitened factors, each at the same parameter fraction;
* ``mixed``: every linear layer at a per-layer rank from ``allocate_ranks_for_budget`` with output-gradient
  weighting (the same total fraction).

Perplexity is measured on held-out text (the HOWTOs). Prints the table and writes JSON::

    python benchmarks/bench_stats_precision.py --device cpu --out benchmarks/results/stats_precision.json
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from peft import get_peft_model

import nsn_peft
from nsn_peft import ActivationStats, NSNConfig, collect_activation_stats, collect_gradient_stats, evaluate_perplexity
from nsn_peft.data import load_texts, python_docs_dir, token_blocks, token_stream
from nsn_peft.hub import load_model_and_tokenizer
from nsn_peft.io import write_json, write_safetensors
from nsn_peft.planning.allocate import allocate_ranks_for_budget, uniform_plan

MLP = ["gate_proj", "up_proj", "down_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", *MLP]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def save_format_1(stats: ActivationStats, folder: Path) -> None:
    """The first storage format (every layer's float64 matrix in full), for the size comparison."""
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "activation_stats.safetensors", {n: g.double().clone() for n, g in stats.grams.items()})
    (folder / "stats.json").write_text("{}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--fraction", type=float, default=0.8)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nsn-stats-precision"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stats_precision.json"))
    args = parser.parse_args()
    torch.set_float32_matmul_precision("highest")
    started = time.perf_counter()
    base, tok = load_model_and_tokenizer(device=args.device)
    device = next(base.parameters()).device
    calib = token_blocks(load_texts(python_docs_dir("tutorial")), tok, 512, args.calib_tokens)
    eval_ids = token_stream(load_texts(python_docs_dir("howto")), tok, args.eval_tokens)

    def ppl(model) -> float:
        return evaluate_perplexity(model, eval_ids, seq_len=512, batch_size=4, show_progress=False)["perplexity"]

    t = time.perf_counter()
    stats = collect_activation_stats(base, calib, max_tokens=None, batch_size=4, show_progress=False)
    grads = collect_gradient_stats(base, calib, max_tokens=None, batch_size=4, show_progress=False)
    calib_s = time.perf_counter() - t
    sizes = {}
    save_format_1(stats, args.workdir / "v1" / "activations")
    save_format_1(grads, args.workdir / "v1" / "gradients")
    sizes["format 1 (float64, every layer)"] = folder_bytes(args.workdir / "v1")
    loaded = {}
    for dtype in (torch.float64, torch.float32):
        name = str(dtype).removeprefix("torch.")
        stats.save(args.workdir / name / "activations", dtype=dtype)
        grads.save(args.workdir / name / "gradients", dtype=dtype)
        sizes[f"format 2 ({name}, shared inputs once, one triangle)"] = folder_bytes(args.workdir / name)
        loaded[name] = (
            ActivationStats.load(args.workdir / name / "activations"),
            ActivationStats.load(args.workdir / name / "gradients"),
        )
    dense = ppl(base)
    print(
        f"calibrated on {calib.numel()} tokens in {calib_s:.0f}s; dense perplexity {dense:.3f} on {eval_ids.numel()} held-out tokens",
        flush=True,
    )
    rows = []
    for name, (act, grad) in loaded.items():
        row = {"storage": name}
        whitened = get_peft_model(copy.deepcopy(base), NSNConfig(target_modules=MLP, init="whitened", stats=act)).eval()
        plan = uniform_plan(base, args.fraction, target_modules=MLP)
        full = nsn_peft.get_max_rank(whitened)
        whitened.set_rank({n: plan.ranks.get(n, full[n]) for n in full})
        row["whitened_mlp"] = ppl(whitened)
        del whitened
        mixed = get_peft_model(copy.deepcopy(base), NSNConfig(target_modules=ALL, init="whitened", stats=act)).eval()
        plan = allocate_ranks_for_budget(
            base, act, args.fraction, target_modules=ALL, gradient_stats=grad, show_progress=False
        )
        full = nsn_peft.get_max_rank(mixed)
        mixed.set_rank({n: plan.ranks.get(n, full[n]) for n in full})
        row["mixed_all_linear"] = ppl(mixed)
        row["mixed_ranks"] = plan.ranks
        del mixed
        rows.append(row)
        print({k: v for k, v in row.items() if k != "mixed_ranks"}, flush=True)
    same_plan = rows[0]["mixed_ranks"] == rows[1]["mixed_ranks"]
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized, fp32)",
        "device": str(device),
        "calibration_tokens": int(calib.numel()),
        "gradient_tokens": int(calib.numel()),
        "eval_tokens": int(eval_ids.numel()),
        "calibration_text": "tutorial/",
        "eval_text": "howto/ (held out)",
        "fraction": args.fraction,
        "dense_ppl": dense,
        "rows": [{k: v for k, v in r.items() if k != "mixed_ranks"} for r in rows],
        "same_mixed_plan": same_plan,
        "folder_bytes": sizes,
        "calibration_s": calib_s,
        "total_s": time.perf_counter() - started,
    }
    write_json(args.out, result)
    print(f"\n| storage | whitened MLP @{args.fraction:.0%} | mixed all-linear @{args.fraction:.0%} |\n|---|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['storage']} | {r['whitened_mlp']:.3f} | {r['mixed_all_linear']:.3f} |")
    print(f"\ndense {dense:.3f}; same mixed plan from both: {same_plan}")
    base_size = sizes["format 1 (float64, every layer)"]
    for label, size in sizes.items():
        print(f"{label}: {size / 1e6:,.0f} MB ({size / base_size:.2f}×)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
