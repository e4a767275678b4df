"""Data-aware compression of SmolLM2-135M: plain SVD vs projected vs whitened vs mixed ranks.

Calibrates on the Python tutorial (32×512 tokens by default), evaluates perplexity on the held-out HOWTOs,
and compresses the MLP-only or all-linear layers to 80/60/50/40% of their parameters:

* ``svd``       – truncated SVD of each weight, every layer at the same parameter fraction
* ``projected`` – utilized-rank projection ``P_T W P_S``; one shared energy, bisected to hit the budget
* ``whitened``  – activation-whitened SVD, every layer at the same parameter fraction
* ``mixed``     – whitened factors with per-layer ranks from ``allocate_ranks_for_budget``

Also times calibration against a plain forward pass over the same tokens.

    python benchmarks/bench_smollm2_compression.py --device cuda --out benchmarks/results/smollm2_compression.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
from peft import get_peft_model

import nsn_peft
from nsn_peft import NSNConfig, allocate_ranks_for_budget, collect_activation_stats, evaluate_perplexity
from nsn_peft.data import load_texts, python_docs_dir, token_blocks, token_stream
from nsn_peft.flops import factoring_saves
from nsn_peft.models import load_model_and_tokenizer
from nsn_peft.rank_search import _layer_shapes

TARGETS = {"mlp": ["gate_proj", "up_proj", "down_proj"], "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
ANCHORS = {("mlp", 0.8): {"svd": 323666, "projected": 162.6, "whitened": 32.3}, ("mlp", 0.5): {"svd": 11.7e6, "projected": 2737, "whitened": 325}}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def uniform_ranks(shapes: dict, fraction: float) -> dict[str, int]:
    return {n: max(1, int(fraction * m * d / (m + d))) for n, (_, m, d) in shapes.items()}


def param_fraction(shapes: dict, ranks: dict[str, int]) -> float:
    dense = sum(m * d for _, m, d in shapes.values())
    return sum(min(ranks[n] * (m + d), m * d) if n in ranks else m * d for n, (_, m, d) in shapes.items()) / dense


def projected_energy_for_budget(base, stats, shapes, fraction: float, steps: int = 14) -> float:
    """Shared energy whose utilized ranks (≈ min(k_S, k_T)) meet the parameter budget (bisection)."""
    spectra = {}
    for name, (module, m, d) in shapes.items():
        c = stats.gram(name).double().to(module.weight.device)
        w = module.weight.detach().double()
        in_values = torch.linalg.eigvalsh(c).flip(0).clamp_min(0)
        chol = nsn_peft.decompose._damped_cholesky(c, 1e-9)
        wl = w @ chol  # eigenvalues of W C Wᵀ are those of the smaller Gram of W L
        small = wl @ wl.T if m <= d else wl.T @ wl
        out_values = torch.linalg.eigvalsh(small).flip(0).clamp_min(0)
        spectra[name] = (in_values.cpu(), out_values.cpu())

    def fraction_at(energy: float) -> float:
        ranks = {}
        for name, (in_values, out_values) in spectra.items():
            k = min(nsn_peft.decompose.energy_rank(in_values, energy), nsn_peft.decompose.energy_rank(out_values, energy))
            _, m, d = shapes[name]
            if factoring_saves(m, d, k):
                ranks[name] = max(k, 1)
        return param_fraction(shapes, ranks)

    lo, hi = 0.05, 0.999999
    for _ in range(steps):
        mid = (lo + hi) / 2
        if fraction_at(mid) <= fraction:
            lo = mid
        else:
            hi = mid
    return lo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calib-tokens", type=int, default=32 * 512)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-eval-tokens", type=int, default=65536)
    parser.add_argument("--fractions", default="0.8,0.6,0.5,0.4")
    parser.add_argument("--targets", default="mlp,all-linear")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/smollm2_compression.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = args.device
    base, tok = load_model_and_tokenizer(device=device)
    calib = token_blocks(load_texts(python_docs_dir("tutorial")), tok, args.seq_len, args.calib_tokens)
    eval_ids = token_stream(load_texts(python_docs_dir("howto")), tok, args.max_eval_tokens)
    # Allocation settings are chosen on a separate validation text (the FAQ), never on the test text.
    valid_ids = token_stream(load_texts(python_docs_dir("faq")), tok, args.max_eval_tokens // 4)

    def ppl(model) -> float:
        return evaluate_perplexity(model, eval_ids, seq_len=args.seq_len, batch_size=8)["perplexity"]

    # Calibration overhead: plain forward vs forward with statistics hooks, same tokens and batches.
    with torch.no_grad():
        for _ in range(2):  # warm-up
            base(input_ids=calib[:8].to(device))
        sync(device)
        start = time.perf_counter()
        for i in range(0, calib.shape[0], 8):
            base(input_ids=calib[i : i + 8].to(device))
        sync(device)
        forward_s = time.perf_counter() - start
    collect_activation_stats(base, calib[:8], max_tokens=None, batch_size=8, show_progress=False)  # warm-up
    sync(device)
    start = time.perf_counter()
    stats = collect_activation_stats(base, calib, max_tokens=None, batch_size=8, show_progress=False, stats_device=None)
    sync(device)
    calib_s = time.perf_counter() - start
    start = time.perf_counter()
    stats = stats.to("cpu")
    copy_s = time.perf_counter() - start
    overhead = calib_s / forward_s
    print(f"calibration {calib_s:.3f}s (+{copy_s:.3f}s copying the matrices to the CPU) vs plain forward {forward_s:.3f}s "
          f"-> {overhead:.2f}x (target <= 1.2x)", flush=True)

    dense_ppl = ppl(base)
    print(f"dense perplexity {dense_ppl:.2f} on {eval_ids.numel()} held-out tokens", flush=True)
    fractions = [float(f) for f in args.fractions.split(",")]
    rows = []
    for target in args.targets.split(","):
        shapes = _layer_shapes(base, TARGETS[target])
        models = {init: get_peft_model(copy.deepcopy(base), NSNConfig(target_modules=TARGETS[target], init=init, stats=stats))
                  for init in ("svd", "whitened")}
        for fraction in fractions:
            row = {"target": target, "fraction": fraction}
            uniform = uniform_ranks(shapes, fraction)
            for init, model in models.items():
                model.set_rank(uniform)
                row[init] = ppl(model)
            row["uniform_fraction"] = param_fraction(shapes, uniform)
            whitened = models["whitened"]
            full = nsn_peft.get_max_rank(whitened)
            variants = {}
            for normalize in ("energy", "none"):
                for floor in (0.0, 0.5):
                    plan = allocate_ranks_for_budget(base, stats, fraction, target_modules=TARGETS[target], normalize=normalize, min_rank_fraction=floor)
                    whitened.set_rank({n: plan.ranks.get(n, full[n]) for n in full})  # dense-kept layers: full rank = exact
                    valid = evaluate_perplexity(whitened, valid_ids, seq_len=args.seq_len, batch_size=8)["perplexity"]
                    variants[f"{normalize},floor={floor}"] = {"valid_ppl": valid, "test_ppl": ppl(whitened), "achieved": plan.target["achieved"],
                                                              "dense_layers": len(plan.kept_dense)}
            best = min(variants, key=lambda k: variants[k]["valid_ppl"])
            row["mixed"] = variants[best]["test_ppl"]
            row["mixed_setting"] = best
            row["mixed_fraction"] = variants[best]["achieved"]
            row["mixed_variants"] = variants
            energy = projected_energy_for_budget(base, stats, shapes, fraction)
            projected = get_peft_model(copy.deepcopy(base), NSNConfig(target_modules=TARGETS[target], init="projected", stats=stats,
                                                                      energy_input=energy, energy_output=energy))
            ranks = nsn_peft.get_max_rank(projected)
            row["projected"] = ppl(projected)
            row["projected_energy"] = energy
            row["projected_fraction"] = param_fraction(shapes, ranks)
            del projected
            row["mixed_vs_whitened"] = 1 - row["mixed"] / row["whitened"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del models
    result = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized, fp32)", "device": device,
              "calibration_tokens": int(calib.numel()), "eval_tokens": int(eval_ids.numel()), "dense_ppl": dense_ppl,
              "calibration_s": calib_s, "stats_copy_to_cpu_s": copy_s, "forward_s": forward_s, "calibration_overhead": overhead, "rows": rows,
              "anchors": {f"{t}@{f}": v for (t, f), v in ANCHORS.items()}}
    print("\n| target | params | plain SVD | projected | whitened | mixed (ours) | mixed vs whitened |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['target']} | {r['fraction']:.0%} | {r['svd']:,.1f} | {r['projected']:,.1f} (e={r['projected_energy']:.4f}) | "
              f"{r['whitened']:,.1f} | {r['mixed']:,.1f} | {r['mixed_vs_whitened']:+.0%} |")
    print(f"\ndense: {dense_ppl:.2f}; calibration overhead {overhead:.2f}x a plain forward")
    nsn_peft.io.write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in result["rows"]}, reverse=True)
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.2), squeeze=False)
    for ax, target in zip(axes[0], targets):
        rows = sorted((r for r in result["rows"] if r["target"] == target), key=lambda r: r["fraction"])
        for method in ("svd", "projected", "whitened", "mixed"):
            ax.plot([r["fraction"] for r in rows], [r[method] for r in rows], marker="o", label=method)
        ax.axhline(result["dense_ppl"], color="k", ls="--", lw=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("fraction of targeted parameters kept")
        ax.set_ylabel("held-out perplexity (log)")
        ax.set_title(f"SmolLM2-135M, {target}")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
