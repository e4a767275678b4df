"""Zero-shot task accuracy of compressed SmolLM2-135M: dense, training-free mixed, calibration-trained (refined).

The 7 tasks of the compression literature (ARC-Easy, ARC-Challenge, HellaSwag, PIQA, WinoGrande, BoolQ,
OpenBookQA; 0-shot, lm-eval-harness, acc_norm where lm-eval reports it and acc otherwise) on the packaged subsets
(`nsn-peft fetch-tasks`), the first ``--limit`` questions of each task. Rows:

* ``dense``        – the model itself;
* ``mixed``        – whitened factors at loss-weighted per-layer ranks (`allocate_ranks_for_budget`), training-free;
* ``refined``      – `compress_and_refine` (allocation decided on validation text, block-wise then end-to-end
                     distillation of the dense model);
* ``adapter``      – already-saved NSN adapters (``--adapter DIR``), at their stored budgets (``--budgets``) or
                     ranks (``--ranks``): e.g. a nested adapter refined for several budgets.

Every compressed row keeps ``--fractions`` of all linear layers' parameters (the output head excluded) and is
calibrated on each of ``--calibrations``: ``python`` (the Python docs' tutorial/library/faq) and ``general``
(the packaged Wikipedia/news/story passages of squad/drop/coqa, none of them a scored task). Perplexity is reported
beside, on text no row calibrated on: the Python docs' ``howto/`` and the last tenth of the general passages
(nsn protocol: documents joined with EOS, 512-token windows). Besides the drop in points, the share of the dense
model's above-chance accuracy kept: (acc − chance) / (dense − chance), per task and for the mean.

A CPU run at reduced size first (checks everything in minutes)::

    python benchmarks/bench_task_accuracy.py --limit 20 --calib-tokens 4096 --e2e-tokens 2048 --blockwise-tokens 2048 \\
        --gradient-tokens 2048 --ppl-tokens 2048 --out /tmp/task_accuracy_small.json

The full CPU run (a few hours on 2 cores) and a nested adapter added as rows::

    python benchmarks/bench_task_accuracy.py --out benchmarks/results/task_accuracy_cpu.json
    python benchmarks/bench_task_accuracy.py --rows dense --adapter ./nsn-nested --budgets 0.5,0.6,0.8 \\
        --out benchmarks/results/task_accuracy_nested.json

The suite's time alone (dense model, shared prefixes vs lm-eval's plain batching on the same questions)::

    python benchmarks/bench_task_accuracy.py --timing --limit 500 --compare-limit 50 --out benchmarks/results/task_suite_time_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model

from nsn_peft import (
    NSNConfig,
    allocate_ranks_for_budget,
    collect_activation_stats,
    collect_gradient_stats,
    evaluate_perplexity,
)
from nsn_peft.benchmark_data import general_texts
from nsn_peft.data import load_texts, python_docs_dir, token_blocks, token_stream
from nsn_peft.evaluation import evaluate_tasks
from nsn_peft.hub import load_adapter, load_model_and_tokenizer
from nsn_peft.io import write_json
from nsn_peft.refine import RefineConfig, compress_and_refine
from nsn_peft.tuner.rank_points import resolve_rank_points

TASKS = "arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa"
PYTHON_PARTS = ("tutorial", "library", "faq")
# Goals of the accuracy issue for the refined rows (mean accuracy drop in points; share of above-chance kept).
GOALS = {0.8: {"drop_pp": 1.0, "kept": 0.95}, 0.6: {"drop_pp": 3.0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="fp32 (default), bf16, fp16: the models' weights")
    parser.add_argument("--model", default=None, help="Hub id / folder / .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--tasks", default=TASKS)
    parser.add_argument("--limit", type=int, default=500, help="questions per task (the first ones)")
    parser.add_argument("--rows", default="dense,mixed,refined", help="which of dense, mixed, refined to run")
    parser.add_argument("--fractions", default="0.8,0.6", help="kept share of all linear layers' parameters")
    parser.add_argument("--calibrations", default="python,general")
    parser.add_argument(
        "--calib-tokens", type=int, default=32768, help="calibration tokens (1/16 held out for validation)"
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--gradient-tokens", type=int, default=16384)
    parser.add_argument("--blockwise-tokens", type=int, default=None, help="default: all calibration tokens")
    parser.add_argument("--e2e-tokens", type=int, default=None, help="default: one pass over the calibration tokens")
    parser.add_argument("--ppl-tokens", type=int, default=16384, help="held-out tokens per perplexity text")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR", help="saved NSN adapters (repeatable)")
    parser.add_argument(
        "--budgets", default=None, help="stored budget plans of --adapter to evaluate, e.g. 0.5,0.6,0.8"
    )
    parser.add_argument("--ranks", default=None, help="ranks of --adapter to evaluate, e.g. 64,full")
    parser.add_argument("--timing", action="store_true", help="only the suite's time on the dense model")
    parser.add_argument(
        "--compare-limit",
        type=int,
        default=0,
        help="with --timing: also lm-eval's plain batching on this many questions per task",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/task_accuracy_cpu.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("lm_eval", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    started = time.perf_counter()
    device = torch.device(args.device)
    base, tok = load_model_and_tokenizer(args.model, device=device, dtype=args.dtype)
    base.eval()
    tasks = args.tasks.split(",")
    result: dict[str, Any] = {
        "model": args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
        "dtype": str(base.dtype).removeprefix("torch."),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "tasks": tasks,
        "limit": args.limit,
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": [],
    }

    def save() -> None:
        result["total_s"] = round(time.perf_counter() - started, 1)
        write_json(args.out, result)

    if args.timing:
        result["timing"] = suite_timing(base, tok, tasks, args)
        save()
        print(json.dumps(result["timing"], indent=2))
        return

    held_out = held_out_texts(tok, args)
    result["perplexity_protocol"] = {
        "name": "nsn",
        "join": "EOS between documents",
        "seq_len": 512,
        "texts": {n: int(ids.numel()) for n, ids in held_out.items()},
    }

    def evaluate(model: Any, row: dict[str, Any], ranks: Any = None, budgets: Any = None) -> None:
        """One row per operating point (the model as it is without ranks or budgets): accuracy and perplexity."""
        points = resolve_rank_points(model, ranks=ranks, target_flops=budgets) if ranks or budgets else [None]
        for point in points:
            evaluation = evaluate_tasks(
                model,
                tasks,
                tokenizer=tok,
                limit=args.limit,
                dense=False,
                points=[point] if point is not None else None,
            )
            entry = {**row, **accuracy_entry(evaluation.points[0])}
            if point is not None:
                entry["point"] = point.label
            with point.context(model) if point is not None else contextlib.nullcontext():
                entry["perplexity"] = {
                    n: evaluate_perplexity(model, ids, seq_len=512, batch_size=4)["perplexity"]
                    for n, ids in held_out.items()
                }
            result["rows"].append(entry)
            add_shares(result)
            save()
            print(json.dumps({k: v for k, v in entry.items() if k != "report"}), flush=True)

    rows = args.rows.split(",")
    if "dense" in rows:
        evaluate(base, {"method": "dense", "calibration": None, "fraction": 1.0})
    fractions = [float(f) for f in args.fractions.split(",")]
    if {"mixed", "refined"} & set(rows):
        for calibration in args.calibrations.split(","):
            train, valid = calibration_blocks(calibration, tok, args)
            t = time.perf_counter()
            stats = collect_activation_stats(
                base, train, max_tokens=None, seq_len=args.seq_len, batch_size=4, show_progress=False
            )
            grad_blocks = train[: max(1, args.gradient_tokens // args.seq_len)]
            grads = collect_gradient_stats(
                base, grad_blocks, max_tokens=None, seq_len=args.seq_len, batch_size=2, show_progress=False
            )
            stats_s = time.perf_counter() - t
            tokens = {
                "calibration": int(train.numel()),
                "validation": int(valid.numel()),
                "gradient_statistics": int(grad_blocks.numel()),
            }
            for fraction in fractions:
                common = {"calibration": calibration, "fraction": fraction}
                if "mixed" in rows:
                    t = time.perf_counter()
                    plan = allocate_ranks_for_budget(base, stats, fraction, gradient_stats=grads, show_progress=False)
                    model = get_peft_model(copy.deepcopy(base), NSNConfig(**plan.to_config_kwargs(stats=stats))).eval()
                    seconds = {"statistics": round(stats_s, 1), "compression": round(time.perf_counter() - t, 1)}
                    evaluate(model, {"method": "mixed", **common, "tokens": tokens, "seconds": seconds})
                    del model
                if "refined" in rows:
                    config = RefineConfig(
                        e2e_tokens=args.e2e_tokens,
                        gradient_tokens=args.gradient_tokens,
                        **({"blockwise_tokens": args.blockwise_tokens} if args.blockwise_tokens else {}),
                    )
                    t = time.perf_counter()
                    model, report = compress_and_refine(
                        copy.deepcopy(base),
                        train,
                        fraction,
                        validation=valid,
                        stats=stats,
                        gradient_stats=grads,
                        config=config,
                        show_progress=False,
                    )
                    seconds = {"statistics": round(stats_s, 1), "compression": round(time.perf_counter() - t, 1)}
                    refine_tokens = {
                        **tokens,
                        "blockwise": (report.blockwise or {}).get("tokens", 0),
                        "end_to_end": (report.end_to_end or {}).get("tokens", 0),
                    }
                    evaluate(
                        model.eval(),
                        {
                            "method": "refined",
                            **common,
                            "allocation": report.allocation,
                            "tokens": refine_tokens,
                            "seconds": seconds,
                            "report": {"validation_nll": report.validation_nll, "seconds": report.seconds},
                        },
                    )
                    del model
    for folder in args.adapter:
        model, _, _ = load_adapter(folder, device=device, dtype=args.dtype)
        model.eval()
        budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else None
        ranks = [r if r == "full" else int(r) for r in args.ranks.split(",")] if args.ranks else None
        evaluate(model, {"method": "adapter", "adapter": str(folder)}, ranks=ranks, budgets=budgets)
        del model
    save()
    print()
    print(markdown(result))
    plot(result, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


def calibration_blocks(name: str, tok: Any, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, validation)`` token blocks of a calibration text (shuffled documents, 1/16 held out)."""
    if name == "python":
        texts = [t for part in PYTHON_PARTS for t in load_texts(python_docs_dir(part))]
    elif name == "general":
        texts = general_calibration_texts()
    else:
        raise SystemExit(f"unknown calibration {name!r}: python or general")
    random.Random(args.seed).shuffle(texts)
    blocks = token_blocks(texts, tok, args.seq_len, args.calib_tokens)
    held = max(1, round(blocks.shape[0] / 16))
    return blocks[:-held], blocks[-held:]


def general_calibration_texts() -> list[str]:
    """The general passages without their held-out last tenth (per source, so every source is in both)."""
    texts = []
    for source in ("squad", "drop", "coqa"):
        passages = general_texts(sources=[source])
        texts += passages[: len(passages) - len(passages) // 10]
    return texts


def held_out_texts(tok: Any, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Perplexity texts no row calibrates on: the Python HOWTOs and the last tenth of each general source."""
    general = []
    for source in ("squad", "drop", "coqa"):
        passages = general_texts(sources=[source])
        general += passages[len(passages) - len(passages) // 10 :]
    random.Random(args.seed + 1).shuffle(general)
    return {
        "python_howto": token_stream(load_texts(python_docs_dir("howto")), tok, args.ppl_tokens),
        "general_held_out": token_stream(general, tok, args.ppl_tokens),
    }


def accuracy_entry(point: Any) -> dict[str, Any]:
    return {
        "mean": point.mean,
        "mean_stderr": point.mean_stderr,
        "mean_chance": point.mean_chance,
        "flops": {k: point.info.get(k) for k in ("model_flops_fraction", "targeted_flops_fraction", "mean_rank")},
        "tasks": {
            n: {
                "metric": s.metric,
                "value": s.value,
                "stderr": s.stderr,
                "acc": s.metrics.get("acc"),
                "acc_stderr": s.metrics.get("acc_stderr"),
                "acc_norm": s.metrics.get("acc_norm"),
                "acc_norm_stderr": s.metrics.get("acc_norm_stderr"),
                "questions": s.questions,
                "chance": s.chance,
            }
            for n, s in point.scores.items()
        },
        "eval_seconds": round(point.seconds, 1),
        "eval_tokens": point.scored_tokens,
    }


def add_shares(result: dict[str, Any]) -> None:
    """Drop in points and share of the dense row's above-chance accuracy kept, per task and for the mean."""
    dense = next((r for r in result["rows"] if r["method"] == "dense"), None)
    if dense is None:
        return
    for row in result["rows"]:
        row["drop_pp"] = (dense["mean"] - row["mean"]) * 100
        row["kept"] = (row["mean"] - row["mean_chance"]) / (dense["mean"] - dense["mean_chance"])
        for name, score in row["tasks"].items():
            ref = dense["tasks"][name]
            span = ref["value"] - ref["chance"]
            score["kept"] = (score["value"] - score["chance"]) / span if span > 1e-9 else None
        # A task where the dense model is at or below chance (a small model on BoolQ/WinoGrande) says nothing about
        # what compression kept: drifting to one answer can gain points there. The goals are judged on the others.
        informative = [n for n, ref in dense["tasks"].items() if ref["value"] > ref["chance"]]
        if informative:
            mean = sum(row["tasks"][n]["value"] for n in informative) / len(informative)
            dense_mean = sum(dense["tasks"][n]["value"] for n in informative) / len(informative)
            chance = sum(dense["tasks"][n]["chance"] for n in informative) / len(informative)
            row["above_chance_tasks"] = {
                "tasks": informative,
                "mean": mean,
                "drop_pp": (dense_mean - mean) * 100,
                "kept": (mean - chance) / (dense_mean - chance),
            }


def suite_timing(base: Any, tok: Any, tasks: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of the task suite on the dense model (shared prefixes), and the same questions on lm-eval's plain
    batching vs shared prefixes at ``--compare-limit`` questions (one process, side by side)."""
    timing: dict[str, Any] = {}
    t = time.perf_counter()
    evaluation = evaluate_tasks(base, tasks, tokenizer=tok, limit=args.limit, dense=False)
    point = evaluation.points[0]
    timing["suite"] = {
        "questions_per_task": args.limit,
        "seconds": round(time.perf_counter() - t, 1),
        "scoring_seconds": round(point.seconds, 1),
        "tokens": point.scored_tokens,
        "mean": point.mean,
        "tasks": {n: s.questions for n, s in point.scores.items()},
    }
    if args.compare_limit:
        runs = {}
        for share in (True, False):
            e = evaluate_tasks(base, tasks, tokenizer=tok, limit=args.compare_limit, dense=False, share_prefixes=share)
            p = e.points[0]
            runs["shared_prefixes" if share else "lm_eval_plain"] = {
                "seconds": round(p.seconds, 1),
                "mean": p.mean,
                "tokens": p.scored_tokens,
            }
        runs["speedup"] = runs["lm_eval_plain"]["seconds"] / runs["shared_prefixes"]["seconds"]
        runs["questions_per_task"] = args.compare_limit
        timing["comparison"] = runs
    return timing


def markdown(result: dict[str, Any]) -> str:
    tasks = result["tasks"]
    head = (
        "| method | calibration | kept | FLOPs | mean ± se | Δ pp | above-chance kept | "
        + " | ".join(tasks)
        + " | ppl howto | ppl general | tokens | s |"
    )
    lines = [
        f"{result['limit']} questions per task; acc_norm where lm-eval reports it, else acc (± standard error); "
        "perplexity: nsn protocol, held-out text",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in result["rows"]:
        label = r["method"] + (f" @{r['point']}" if r.get("point") else "")
        cells = [f"{r['tasks'][t]['value']:.3f} ± {r['tasks'][t]['stderr'] or 0:.3f}" for t in tasks]
        ppl = r.get("perplexity", {})
        tokens = r.get("tokens", {})
        train_tokens = tokens.get("calibration", 0) + tokens.get("end_to_end", 0) if tokens else 0
        seconds = sum((r.get("seconds") or {}).values())
        lines.append(
            f"| {label} | {r.get('calibration') or '–'} | {r.get('fraction', '–') if r.get('fraction') else '–'} | "
            f"{(r['flops'].get('model_flops_fraction') or 1):.3f} | {r['mean']:.3f} ± {r['mean_stderr'] or 0:.3f} | "
            f"{-r.get('drop_pp', 0):+.1f} | {r.get('kept', 1):.0%} | "
            + " | ".join(cells)
            + f" | {ppl.get('python_howto', float('nan')):.2f} | {ppl.get('general_held_out', float('nan')):.2f} | "
            f"{train_tokens:,} | {seconds:.0f} |"
        )
    checks = []
    for r in result["rows"]:
        goal = GOALS.get(r.get("fraction")) if r["method"] == "refined" else None
        if goal:
            judged = r.get("above_chance_tasks") or r
            ok = judged["drop_pp"] <= goal["drop_pp"] and judged["kept"] >= goal.get("kept", 0)
            where = f"over {', '.join(judged['tasks'])}" if "tasks" in judged else "over all tasks"
            checks.append(
                f"- refined {r['fraction']:.0%} kept, {r['calibration']} ({where}, where dense is above chance): "
                f"{-judged['drop_pp']:+.1f} pp, "
                f"{judged['kept']:.0%} of above-chance accuracy kept (goal: ≤ {goal['drop_pp']} pp"
                + (f", ≥ {goal['kept']:.0%}" if "kept" in goal else "")
                + f"): {'met' if ok else 'missed'}"
            )
    return "\n".join(lines + ([""] + checks if checks else []))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    series: dict[str, list] = {}
    for r in result["rows"]:
        if r["method"] == "dense":
            ax.axhline(r["mean"], color="black", ls="--", lw=1, label=f"dense ({r['mean']:.3f})")
            ax.axhline(r["mean_chance"], color="gray", ls=":", lw=1, label=f"chance ({r['mean_chance']:.3f})")
            continue
        key = r["method"] + (
            f" ({r['calibration']})" if r.get("calibration") else f" {Path(r.get('adapter', '')).name}"
        )
        series.setdefault(key, []).append(
            (r["flops"].get("model_flops_fraction") or 1.0, r["mean"], r["mean_stderr"] or 0)
        )
    for key, points in series.items():
        points.sort()
        xs, ys, es = zip(*points)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=key)
    ax.set_xlabel("FLOPs vs dense model (all matmuls)")
    ax.set_ylabel("mean zero-shot accuracy, 7 tasks")
    ax.set_title(f"SmolLM2-135M, {result['limit']} questions per task", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
