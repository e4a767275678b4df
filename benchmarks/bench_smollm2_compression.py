"""Compression of SmolLM2-135M: training-free factors vs calibration-trained (refined) factors.

Calibration text: the Python docs' ``tutorial/`` + ``library/`` + ``faq/`` (documents shuffled, ``--calib-tokens``
tokens in 512-token sequences, 1/16 of them held out as validation text for every decision). Test text, never
used for any choice: the held-out ``howto/`` and, as text of another kind, the C-API reference ``c-api/``.
For MLP-only and all-linear targets at 80/60/50/40% of the targeted parameters kept:

* ``svd``       – truncated SVD of each weight, every layer at the same parameter fraction
* ``whitened``  – activation-whitened SVD, same uniform fractions
* ``mixed``     – whitened factors with loss-weighted per-layer ranks (``allocate_ranks_for_budget``), training-free
* ``blockwise`` – :func:`nsn_peft.refine.compress_and_refine` without its end-to-end stage: the allocation (mixed or
                  uniform, decided on validation text after block-wise refinement of both), then block-wise refinement
* ``refined``   – the same, followed by end-to-end distillation of the dense model's logits (the full recipe)

``--tune`` first measures the refinement learning rates on the validation text (all-linear, 60% kept) and uses
the best ones for every configuration. Prints a markdown table (ratios to dense), writes JSON and a PNG plot.
Run on an H100::

    python benchmarks/bench_smollm2_compression.py --device cuda --tune --out benchmarks/results/smollm2_compression.json

A quick end-to-end check on a CPU::

    python benchmarks/bench_smollm2_compression.py --device cpu --seq-len 64 --calib-tokens 2048 --eval-tokens 1024 \\
        --fractions 0.6 --targets all-linear --blockwise-tokens 512 --e2e-tokens 512 --out /tmp/compression.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
from peft import get_peft_model

import nsn_peft
from nsn_peft import NSNConfig, collect_activation_stats, collect_gradient_stats, evaluate_perplexity
from nsn_peft.data import load_texts, python_docs_dir, token_blocks, token_stream
from nsn_peft.hub import load_model_and_tokenizer
from nsn_peft.io import write_json
from nsn_peft.planning.allocate import allocate_ranks_for_budget, uniform_plan, whitened_spectra
from nsn_peft.planning.plan import RankPlan
from nsn_peft.refine import RefineConfig, compress_and_refine, mean_nll, nsn_factors, refine_end_to_end

TARGETS = {
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
METHODS = ("svd", "whitened", "mixed", "blockwise", "refined")
TEST_SETS = ("howto", "c-api")
CALIBRATION_PARTS = ("tutorial", "library", "faq")
# Issue targets for all-linear (ratio to dense perplexity on held-out text), with <= 1M calibration tokens.
TARGET_RATIOS = {0.8: 1.10, 0.6: 1.40, 0.5: 1.80}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="Hub id / folder / .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument(
        "--calib-tokens", type=int, default=1_000_000, help="calibration tokens in all (validation included)"
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=65536, help="test tokens per held-out text")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--fractions", default="0.8,0.6,0.5,0.4")
    parser.add_argument("--targets", default="all-linear,mlp")
    parser.add_argument(
        "--refine-fractions", default=None, help="fractions that get the refined variants (default: all)"
    )
    parser.add_argument("--blockwise-tokens", type=int, default=None, help="default: RefineConfig's")
    parser.add_argument("--e2e-tokens", type=int, default=None, help="default: one pass over the calibration tokens")
    parser.add_argument(
        "--tune", action="store_true", help="measure the refinement learning rates first (validation text)"
    )
    parser.add_argument("--tune-fraction", type=float, default=0.6)
    parser.add_argument("--blockwise-lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--e2e-lrs", default="5e-4,1e-3,2e-3")
    parser.add_argument("--gradient-tokens", type=int, default=131072)
    parser.add_argument("--docs-root", default=None, help="Python docs _sources folder (default: the system's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/smollm2_compression.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    started = time.perf_counter()
    base, tok = load_model_and_tokenizer(args.model, device=device)
    base.eval()

    def docs(part: str) -> list[str]:
        return load_texts(Path(args.docs_root) / part if args.docs_root else python_docs_dir(part))

    pool = [text for part in CALIBRATION_PARTS for text in docs(part)]
    random.Random(args.seed).shuffle(pool)
    calibration = token_blocks(pool, tok, args.seq_len, args.calib_tokens)
    held = max(1, round(calibration.shape[0] / 16))
    train, valid = calibration[:-held], calibration[-held:]
    tests = {name: token_stream(docs(name), tok, args.eval_tokens) for name in TEST_SETS}
    # One --gradient-tokens for the training-free mixed rows and the recipe's own allocation.
    config = RefineConfig(
        e2e_tokens=args.e2e_tokens,
        gradient_tokens=args.gradient_tokens,
        **({"blockwise_tokens": args.blockwise_tokens} if args.blockwise_tokens is not None else {}),
    )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def test_ppl(model) -> dict[str, float]:
        return {
            name: evaluate_perplexity(model, ids, seq_len=args.seq_len, batch_size=args.eval_batch_size)["perplexity"]
            for name, ids in tests.items()
        }

    t = time.perf_counter()
    stats = collect_activation_stats(
        base, train, max_tokens=None, seq_len=args.seq_len, batch_size=8, show_progress=False
    )
    grad_blocks = train[: max(1, args.gradient_tokens // args.seq_len)]
    grads = collect_gradient_stats(
        base, grad_blocks, max_tokens=None, seq_len=args.seq_len, batch_size=4, show_progress=False
    )
    sync()
    stats_s = time.perf_counter() - t
    dense = test_ppl(base)
    dense_valid = mean_nll(base, valid)
    total_params = sum(p.numel() for p in base.parameters())
    print(
        f"calibration {calibration.numel():,} tokens ({train.numel():,} train + {valid.numel():,} validation), statistics "
        f"in {stats_s:.1f}s; dense perplexity {dense}",
        flush=True,
    )

    result: dict = {
        "model": args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized, fp32)",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "calibration_parts": list(CALIBRATION_PARTS),
        "test_sets": list(TEST_SETS),
        "calibration_tokens": int(calibration.numel()),
        "train_tokens": int(train.numel()),
        "validation_tokens": int(valid.numel()),
        "gradient_tokens": int(grad_blocks.numel()),
        "eval_tokens": {n: int(ids.numel()) for n, ids in tests.items()},
        "seq_len": args.seq_len,
        "dense_ppl": dense,
        "dense_valid_nll": dense_valid,
        "model_params": total_params,
        "statistics_s": stats_s,
        "rows": [],
        "tuning": None,
    }

    def save() -> None:
        result["total_s"] = time.perf_counter() - started
        write_json(args.out, result)

    if args.tune:
        config = tune(base, train, valid, stats, grads, config, args, result, sync)
        save()
    result["refine_config"] = config.__dict__.copy()
    refine_fractions = [float(f) for f in (args.refine_fractions or args.fractions).split(",")]

    for target in args.targets.split(","):
        names = TARGETS[target]
        adapters = {
            init: get_peft_model(copy.deepcopy(base), NSNConfig(target_modules=names, init=init, stats=stats)).eval()
            for init in ("svd", "whitened")
        }
        spectra = whitened_spectra(base, stats, target_modules=names, gradient_stats=grads, show_progress=False)
        for fraction in [float(f) for f in args.fractions.split(",")]:
            row: dict = {"target": target, "fraction": fraction}
            uniform = uniform_plan(base, fraction, target_modules=names)
            mixed = allocate_ranks_for_budget(
                base, stats, fraction, target_modules=names, gradient_stats=grads, spectra=spectra, show_progress=False
            )
            row["uniform_fraction"], row["mixed_fraction"] = uniform.target["achieved"], mixed.target["achieved"]
            row["model_removed"] = removed_share(uniform, total_params)
            for init, model in adapters.items():
                model.set_rank(_ranks_for(model, uniform))
                row[init] = test_ppl(model)
            model = adapters["whitened"]
            model.set_rank(_ranks_for(model, mixed))
            row["mixed"] = test_ppl(model)
            row["mixed_valid_nll"] = mean_nll(model, valid)
            row["mixed_model_removed"] = removed_share(mixed, total_params)
            if fraction in refine_fractions:
                refine_row(row, base, train, valid, stats, grads, names, fraction, config, test_ppl, sync, total_params)
            result["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("refine_report",)}), flush=True)
            save()
        del adapters
    save()
    print()
    print(markdown(result))
    plot(result, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


def refine_row(row, base, train, valid, stats, grads, names, fraction, config, test_ppl, sync, total_params) -> None:
    """The refined variants of one configuration: allocation + block-wise, then + end-to-end (GPU seconds each)."""
    sync()
    t = time.perf_counter()
    model, report = compress_and_refine(
        copy.deepcopy(base),
        train,
        fraction,
        target_modules=names,
        validation=valid,
        stats=stats,
        gradient_stats=grads,
        config=replace(config, e2e_tokens=0),
        show_progress=False,
    )
    sync()
    blockwise_s = time.perf_counter() - t
    row["blockwise"] = test_ppl(model)
    row["allocation"] = report.allocation
    row["candidates"] = report.candidates
    row["blockwise_valid_nll"] = report.validation_nll.get("blockwise")
    plan = RankPlan(report.ranks, report.kept_dense, shapes={n: list(s) for n, s in _shapes(model, report).items()})
    row["refined_model_removed"] = removed_share(plan, total_params)
    t = time.perf_counter()
    e2e = refine_end_to_end(
        model,
        train,
        tokens=config.e2e_tokens,
        lr=config.e2e_lr,
        batch_size=config.batch_size,
        temperature=config.temperature,
        precision=config.precision,
        seed=config.seed,
        show_progress=False,
    )
    sync()
    e2e_s = time.perf_counter() - t
    row["refined"] = test_ppl(model)
    row["refined_valid_nll"] = mean_nll(model, valid)
    blockwise_tokens = report.blockwise["tokens"] if report.blockwise else 0
    row["tokens"] = {
        "calibration_distinct": int(train.numel() + valid.numel()),
        "blockwise": blockwise_tokens,
        "blockwise_epochs": config.blockwise_epochs,
        "end_to_end": e2e.tokens,
        "gradient_statistics": int(min(train.numel(), config.gradient_tokens or train.numel())),
    }
    row["gpu_seconds"] = {
        "allocation_and_blockwise": round(blockwise_s, 1),
        "end_to_end": round(e2e_s, 1),
        "total": round(blockwise_s + e2e_s, 1),
    }
    row["refine_report"] = {"seconds": report.seconds, "blockwise": report.blockwise, "end_to_end_kl": e2e.kl_history}
    del model


def _shapes(model, report) -> dict[str, tuple[int, int]]:
    layers = nsn_peft.tuner.ranks.nsn_layers(model)
    shapes = {n: (layer.out_features, layer.in_features) for n, layer in layers.items()}
    for name in report.kept_dense:
        module = model.get_base_model().get_submodule(name)
        shapes[name] = (module.out_features, module.in_features)
    return shapes


def removed_share(plan: RankPlan, total_params: int) -> float:
    """Share of the whole model's parameters removed by ``plan``."""
    removed = sum(m * d - plan.ranks[n] * (m + d) for n, (m, d) in plan.shapes.items() if n in plan.ranks)
    return removed / total_params


def tune(base, train, valid, stats, grads, config: RefineConfig, args, result, sync) -> RefineConfig:
    """Pick the block-wise then the end-to-end learning rate on the validation text (all-linear, one fraction)."""
    names = TARGETS["all-linear"]
    fraction = args.tune_fraction
    table: dict = {"fraction": fraction, "target": "all-linear", "blockwise": {}, "end_to_end": {}}
    result["tuning"] = table
    best_model = None
    for lr in [float(x) for x in args.blockwise_lrs.split(",")]:
        sync()
        t = time.perf_counter()
        model, report = compress_and_refine(
            copy.deepcopy(base),
            train,
            fraction,
            target_modules=names,
            validation=valid,
            stats=stats,
            gradient_stats=grads,
            allocation="mixed",
            config=replace(config, blockwise_lr=lr, e2e_tokens=0),
            show_progress=False,
        )
        sync()
        nll = report.validation_nll["blockwise"]
        table["blockwise"][str(lr)] = {
            "valid_nll": nll,
            "init_valid_nll": report.validation_nll["init"],
            "seconds": round(time.perf_counter() - t, 1),
        }
        print(
            f"tune block-wise lr {lr:g}: validation NLL {nll:.4f} (init {report.validation_nll['init']:.4f})",
            flush=True,
        )
        if best_model is None or nll < best_model[0]:
            best_model = (nll, lr, model)
        else:
            del model
    _, blockwise_lr, model = best_model
    factors = nsn_factors(model)
    start = {k: p.detach().clone() for k, p in factors.items()}
    best = None
    for lr in [float(x) for x in args.e2e_lrs.split(",")]:
        with torch.no_grad():
            for k, p in factors.items():
                p.copy_(start[k])
        sync()
        t = time.perf_counter()
        refine_end_to_end(
            model, train, tokens=config.e2e_tokens, lr=lr, batch_size=config.batch_size, show_progress=False
        )
        sync()
        nll = mean_nll(model, valid)
        table["end_to_end"][str(lr)] = {"valid_nll": nll, "seconds": round(time.perf_counter() - t, 1)}
        print(f"tune end-to-end lr {lr:g}: validation NLL {nll:.4f}", flush=True)
        if best is None or nll < best[0]:
            best = (nll, lr)
    table["chosen"] = {"blockwise_lr": blockwise_lr, "e2e_lr": best[1]}
    del model
    return replace(config, blockwise_lr=blockwise_lr, e2e_lr=best[1])


def _ranks_for(model, plan: RankPlan) -> dict[str, int]:
    """Per-layer active ranks of a full-rank adapter realising ``plan`` (dense-kept layers: full rank = exact)."""
    full = nsn_peft.get_max_rank(model)
    return {n: plan.ranks.get(n, full[n]) for n in full}


def markdown(result: dict) -> str:
    dense = result["dense_ppl"]
    lines = [
        "Dense perplexity: "
        + ", ".join(f"{n} {v:.2f}" for n, v in dense.items())
        + f" ({result['calibration_tokens']:,} calibration tokens from {'+'.join(result['calibration_parts'])})",
        "",
    ]
    for test in result["test_sets"]:
        lines += [
            f"**{test}/** (perplexity, × dense)",
            "",
            "| target | params kept | model removed | " + " | ".join(METHODS) + " | allocation | GPU s (refine) |",
            "|---|---:|---:|" + "---:|" * len(METHODS) + "---|---:|",
        ]
        for r in result["rows"]:
            cells = []
            for m in METHODS:
                v = r.get(m, {}).get(test) if isinstance(r.get(m), dict) else None
                cells.append("–" if v is None else f"{v:,.2f} ({v / dense[test]:.2f}×)")
            gpu = r.get("gpu_seconds", {}).get("total")
            lines.append(
                f"| {r['target']} | {r['fraction']:.0%} | {r['model_removed']:.1%} | "
                + " | ".join(cells)
                + f" | {r.get('allocation', '–')} | {'–' if gpu is None else f'{gpu:.0f}'} |"
            )
        lines.append("")
    checks = []
    for r in result["rows"]:
        goal = TARGET_RATIOS.get(r["fraction"])
        if r["target"] == "all-linear" and goal and "refined" in r:
            for test in result["test_sets"]:
                ratio = r["refined"][test] / dense[test]
                checks.append(
                    f"- all-linear {r['fraction']:.0%} kept, {test}: {ratio:.3f}× dense (target ≤ {goal}×: "
                    f"{'met' if ratio <= goal else f'missed by {ratio / goal - 1:.1%}'}); GPU "
                    f"{r['gpu_seconds']['total']:.0f} s (target < 300 s)"
                )
    if checks:
        lines += ["Targets:", *checks]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in result["rows"]}, reverse=True)
    tests = result["test_sets"]
    fig, axes = plt.subplots(len(tests), len(targets), figsize=(6 * len(targets), 4.2 * len(tests)), squeeze=False)
    for i, test in enumerate(tests):
        for ax, target in zip(axes[i], targets):
            rows = sorted((r for r in result["rows"] if r["target"] == target), key=lambda r: r["fraction"])
            for method in METHODS:
                points = [(r["fraction"], r[method][test]) for r in rows if isinstance(r.get(method), dict)]
                if points:
                    ax.plot(*zip(*points), marker="o", label=method)
            ax.axhline(result["dense_ppl"][test], color="k", ls="--", lw=1, label="dense")
            ax.set_yscale("log")
            ax.set_xlabel("fraction of targeted parameters kept")
            ax.set_ylabel(f"perplexity on held-out {test}/ (log)")
            ax.set_title(f"SmolLM2-135M, {target}")
            ax.invert_xaxis()
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
