"""Data-aware compression of SmolLM2-135M: plain SVD vs projected vs whitened vs mixed ranks.

Calibrates on the Python tutorial (32×512 tokens by default), evaluates perplexity on the held-out HOWTOs,
and compresses the MLP-only or all-linear layers to 80/60/50/40% of their parameters:

* ``svd``       – truncated SVD of each weight, every layer at the same parameter fraction
* ``projected`` – utilized-rank projection ``P_T W P_S``; one shared energy, bisected to hit the budget
* ``whitened``  – activation-whitened SVD, every layer at the same parameter fraction
* ``mixed``     – whitened factors with per-layer ranks from ``allocate_ranks_for_budget`` (same total)

The allocation weighs truncation errors by output-gradient statistics (``collect_gradient_stats``, one
forward+backward over calibration text) or, without them, normalises whitened output errors; the variant
reported as ``mixed`` is chosen on separate validation text (the Python FAQ), never on the test text, and
every variant is kept in the JSON. Prints a markdown table with the ratios against uniform whitened and the
reference figures, writes JSON and a PNG plot next to it. Run on an H100::

    python benchmarks/bench_smollm2_compression.py --device cuda --out benchmarks/results/smollm2_compression.json

A quick end-to-end check on a CPU::

    python benchmarks/bench_smollm2_compression.py --device cpu --max-eval-tokens 2048 --calib-tokens 4096 \\
        --fractions 0.5 --targets mlp --out /tmp/smollm2_compression.json
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
from nsn_peft import NSNConfig, collect_activation_stats, collect_gradient_stats, evaluate_perplexity
from nsn_peft.data import load_texts, python_docs_dir, token_blocks, token_stream
from nsn_peft.hub import load_model_and_tokenizer
from nsn_peft.io import write_json
from nsn_peft.planning.allocate import (
    allocate_ranks_for_budget,
    projected_plan_for_budget,
    uniform_plan,
    whitened_spectra,
)
from nsn_peft.planning.plan import RankPlan

TARGETS = {"mlp": ["gate_proj", "up_proj", "down_proj"], "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
METHODS = ("svd", "projected", "whitened", "mixed")
# Reference figures (MLP only, 32×512 calibration tokens): whitened should be at or below them.
ANCHORS = {("mlp", 0.8): {"dense": 12.26, "svd": 323666, "projected": 162.6, "whitened": 32.3},
           ("mlp", 0.5): {"dense": 12.26, "svd": 11.7e6, "projected": 2737, "whitened": 325}}
# Allocation variants tried for "mixed" (chosen on validation text): loss-weighted errors from output-gradient
# statistics ("fisher"), or whitened output errors normalised at the uniform plan / by output energy.
VARIANTS = {
    "fisher": {"gradient": True},
    "uniform-normalised": {"normalize": "uniform"},
    "energy-normalised": {"normalize": "energy"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="Hub id / folder / .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--calib-tokens", type=int, default=32 * 512)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-eval-tokens", type=int, default=65536, help="held-out test tokens (HOWTOs)")
    parser.add_argument("--valid-tokens", type=int, default=16384, help="validation tokens (FAQ) to pick the mixed setting")
    parser.add_argument("--grad-tokens", type=int, default=None, help="calibration tokens for output-gradient statistics "
                        "(default: all calibration tokens)")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--fractions", default="0.8,0.6,0.5,0.4")
    parser.add_argument("--targets", default="mlp,all-linear")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"mixed allocation variants ({', '.join(VARIANTS)})")
    parser.add_argument("--docs-root", default=None, help="Python docs _sources folder (default: the system's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/smollm2_compression.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    methods = [m for m in args.methods.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    unknown = (set(methods) - set(METHODS)) | (set(variants) - set(VARIANTS)) | (set(args.targets.split(",")) - set(TARGETS))
    if unknown:
        parser.error(f"unknown methods/variants/targets: {sorted(unknown)}")
    device = torch.device(args.device)
    started = time.perf_counter()
    base, tok = load_model_and_tokenizer(args.model, device=device)

    def docs(part: str):
        return load_texts(Path(args.docs_root) / part if args.docs_root else python_docs_dir(part))

    calib = token_blocks(docs("tutorial"), tok, args.seq_len, args.calib_tokens)
    eval_ids = token_stream(docs("howto"), tok, args.max_eval_tokens)
    valid_ids = token_stream(docs("faq"), tok, args.valid_tokens)

    def ppl(model, ids=eval_ids) -> float:
        return evaluate_perplexity(model, ids, seq_len=args.seq_len, batch_size=args.eval_batch_size)["perplexity"]

    start = time.perf_counter()
    stats = collect_activation_stats(base, calib, max_tokens=None, batch_size=8, show_progress=False)
    calib_s = time.perf_counter() - start
    grads, grad_tokens = None, 0
    if "mixed" in methods and any(VARIANTS[v].get("gradient") for v in variants):
        start = time.perf_counter()
        grad_blocks = calib if args.grad_tokens is None else calib[: max(1, args.grad_tokens // args.seq_len)]
        grads = collect_gradient_stats(base, grad_blocks, max_tokens=None, batch_size=4, show_progress=False)
        grad_tokens = int(grad_blocks.numel())
        print(f"output-gradient statistics on {grad_blocks.numel()} tokens in {time.perf_counter() - start:.1f}s", flush=True)
    dense_ppl = ppl(base)
    print(f"calibrated on {calib.numel()} tokens in {calib_s:.1f}s; dense perplexity {dense_ppl:.3f} on {eval_ids.numel()} "
          f"held-out tokens", flush=True)

    rows = []

    def summary() -> dict:
        return {"model": args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized, fp32)", "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "calibration_tokens": int(calib.numel()), "eval_tokens": int(eval_ids.numel()),
                "valid_tokens": int(valid_ids.numel()), "gradient_tokens": grad_tokens, "seq_len": args.seq_len,
                "dense_ppl": dense_ppl, "calibration_s": calib_s, "total_s": time.perf_counter() - started, "rows": rows,
                "anchors": {f"{t}@{f}": v for (t, f), v in ANCHORS.items()}}

    for target in args.targets.split(","):
        names = TARGETS[target]
        # One full-rank adapter per init serves every fraction: set_rank only slices the nested factors.
        adapters = {init: get_peft_model(copy.deepcopy(base), NSNConfig(target_modules=names, init=init, stats=stats)).eval()
                    for init in ("svd", "whitened") if init in methods or (init == "whitened" and "mixed" in methods)}
        spectra = {}
        if "mixed" in methods:
            spectra["output_error"] = whitened_spectra(base, stats, target_modules=names, show_progress=False)
            if grads is not None:
                spectra["loss"] = whitened_spectra(base, stats, target_modules=names, gradient_stats=grads, show_progress=False)
        for fraction in [float(f) for f in args.fractions.split(",")]:
            row: dict = {"target": target, "fraction": fraction}
            uniform = uniform_plan(base, fraction, target_modules=names)
            row["uniform_fraction"] = uniform.target["achieved"]
            for init, model in adapters.items():
                if init in methods:
                    model.set_rank(_ranks_for(model, uniform))
                    row[init] = ppl(model)
            if "mixed" in methods:
                model = adapters["whitened"]
                results = {}
                for variant in variants:
                    options = dict(VARIANTS[variant])
                    if options.pop("gradient", False):
                        plan = allocate_ranks_for_budget(base, stats, fraction, target_modules=names, gradient_stats=grads,
                                                         spectra=spectra["loss"], show_progress=False, **options)
                    else:
                        plan = allocate_ranks_for_budget(base, stats, fraction, target_modules=names,
                                                         spectra=spectra["output_error"], show_progress=False, **options)
                    model.set_rank(_ranks_for(model, plan))
                    results[variant] = {"valid_ppl": ppl(model, valid_ids), "test_ppl": ppl(model),
                                        "achieved": plan.target["achieved"], "dense_layers": len(plan.kept_dense),
                                        "ranks": plan.ranks}
                best = min(results, key=lambda v: results[v]["valid_ppl"])
                row.update(mixed=results[best]["test_ppl"], mixed_setting=best, mixed_fraction=results[best]["achieved"],
                           mixed_variants={v: {k: x for k, x in r.items() if k != "ranks"} for v, r in results.items()},
                           mixed_ranks=results[best]["ranks"])
            if "projected" in methods:
                plan = projected_plan_for_budget(base, stats, fraction, target_modules=names, show_progress=False)
                model = get_peft_model(copy.deepcopy(base), NSNConfig(**plan.to_config_kwargs(stats=stats))).eval()
                row.update(projected=ppl(model), projected_energy=plan.target["energy"], projected_fraction=plan.target["achieved"])
                del model
            if "mixed" in row and "whitened" in row:
                row["mixed_vs_whitened"] = 1 - row["mixed"] / row["whitened"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("mixed_ranks", "mixed_variants")}), flush=True)
            write_json(args.out, summary())  # rows so far: a run cut short keeps what it measured
        del adapters
    result = summary()
    print()
    print(markdown(result))
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


def _ranks_for(model, plan: RankPlan) -> dict[str, int]:
    """Per-layer active ranks of a full-rank adapter realising ``plan`` (dense-kept layers: full rank = exact)."""
    full = nsn_peft.get_max_rank(model)
    return {n: plan.ranks.get(n, full[n]) for n in full}


def _fmt(value) -> str:
    return "–" if value is None else f"{value:,.1f}"


def markdown(result: dict) -> str:
    methods = [m for m in METHODS if any(m in r for r in result["rows"])]
    lines = [f"Dense perplexity: {result['dense_ppl']:.2f} ({result['eval_tokens']:,} held-out tokens, "
             f"{result['calibration_tokens']:,} calibration tokens)", "",
             "| target | params | " + " | ".join(methods) + " | mixed vs whitened | mixed setting |",
             "|---|---:|" + "---:|" * len(methods) + "---:|---|"]
    for r in result["rows"]:
        cells = [_fmt(r.get(m)) for m in methods]
        ratio = f"{r['mixed_vs_whitened']:+.0%} lower" if "mixed_vs_whitened" in r else "–"
        lines.append(f"| {r['target']} | {r['fraction']:.0%} | " + " | ".join(cells) + f" | {ratio} | {r.get('mixed_setting', '–')} |")
    checks = []
    for r in result["rows"]:
        anchor = result["anchors"].get(f"{r['target']}@{r['fraction']}")
        if anchor and "whitened" in r:
            ok = r["whitened"] <= anchor["whitened"]
            checks.append(f"- {r['target']} {r['fraction']:.0%}: whitened {r['whitened']:,.1f} vs reference {anchor['whitened']:,} "
                          f"({'met' if ok else 'NOT met'}); svd {_fmt(r.get('svd'))} vs {anchor['svd']:,}; "
                          f"projected {_fmt(r.get('projected'))} vs {anchor['projected']:,}")
        if r["fraction"] in (0.6, 0.5) and "mixed_vs_whitened" in r:
            ok = r["mixed_vs_whitened"] >= 0.25
            checks.append(f"- {r['target']} {r['fraction']:.0%}: mixed {r['mixed_vs_whitened']:+.1%} lower than uniform whitened "
                          f"(target >= 25%: {'met' if ok else 'NOT met'})")
    if checks:
        lines += ["", "Targets:", *checks]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in result["rows"]}, reverse=True)
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.2), squeeze=False)
    for ax, target in zip(axes[0], targets):
        rows = sorted((r for r in result["rows"] if r["target"] == target), key=lambda r: r["fraction"])
        for method in METHODS:
            points = [(r["fraction"], r[method]) for r in rows if method in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.axhline(result["dense_ppl"], color="k", ls="--", lw=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("fraction of targeted parameters kept")
        ax.set_ylabel("held-out perplexity (log scale)")
        ax.set_title(f"SmolLM2-135M, {target}")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
