"""One refined adapter for every budget: a nested ladder vs single-budget specialists on SmolLM2-135M.

Rows (all linear layers of the blocks compressed; the output head kept):

* ``dense``          – the model itself;
* ``dense_t``        – the dense model with one temperature fitted on the calibration text
                       (:func:`nsn_peft.fit_temperature`): a distilled student can beat an over-confident teacher
                       by calibration alone, so this is the fair baseline of the refined rows;
* ``nested``         – :func:`nsn_peft.refine.compress_and_refine` with ``budgets=[...]``: one adapter, nested
                       per-layer plans, both stages training every budget together (``--samplings``: how a step
                       picks its budgets), evaluated at each budget with ``set_rank(flops=b)``;
* ``specialist=b``   – ``compress_and_refine(fraction=b)`` given the same tokens as the whole ladder
                       (block-wise and end-to-end), one model per budget.

Columns: perplexity on held-out text no row calibrates on (the Python docs' ``howto/`` and ``c-api/``, and the last
tenth of the packaged general passages; nsn protocol, 512-token windows), the validation NLL, with ``--tasks`` the
mean zero-shot accuracy of 7 tasks (the packaged subsets, first ``--limit`` questions each) and the share of the
dense model's above-chance accuracy kept, and tokens and seconds per stage. The summary puts each budget's nested
row beside its specialist: perplexity ratio nested / specialist, accuracy difference, and the time of the ladder
against one specialist.

Configurations (``--config``; every size can be overridden): ``gpu`` (budgets 0.4/0.5/0.6/0.8, the calibration
token budget of the refined rows in docs/benchmarks.md), ``cpu`` (budgets 0.5/0.6/0.8, minutes per row on 2 cores)
and ``tiny`` (seconds: checks the script). On one GPU, in two calls that each stop cleanly before their limit
(``--time-limit``; the JSON is rewritten after every row) and share the dense statistics (``--cache-dir``)::

    python benchmarks/bench_nested_refine.py --config gpu --only "nested;dense" --tasks --time-limit 480 \\
        --cache-dir /tmp/nr_cache --out benchmarks/results/nested_refine_gpu_1.json
    python benchmarks/bench_nested_refine.py --config gpu --only "specialist=0.4,0.5,0.6,0.8" --tasks \\
        --time-limit 480 --cache-dir /tmp/nr_cache --out benchmarks/results/nested_refine_gpu_2.json
    python benchmarks/bench_nested_refine.py --merge benchmarks/results/nested_refine_gpu_1.json \\
        benchmarks/results/nested_refine_gpu_2.json --out benchmarks/results/nested_refine_gpu.json

A check of the whole script in seconds: ``python benchmarks/bench_nested_refine.py --config tiny --tasks --out
/tmp/nested_tiny.json``. ``NSN_PEFT_PYTHON_DOCS`` points at another copy of the Python docs' ``_sources``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nsn_peft import (
    ActivationStats,
    collect_activation_stats,
    collect_gradient_stats,
    evaluate_perplexity,
    fit_temperature,
    with_temperature,
)
from nsn_peft.benchmark_data import general_texts
from nsn_peft.data import load_texts, python_docs_dir, token_blocks, token_stream
from nsn_peft.hub import load_model_and_tokenizer
from nsn_peft.io import write_json
from nsn_peft.refine import RefineConfig, compress_and_refine

TASKS = "arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa"
PYTHON_PARTS = ("tutorial", "library", "faq")
GENERAL_SOURCES = ("squad", "drop", "coqa")
CONFIGS: dict[str, dict[str, Any]] = {
    # ~1M calibration tokens of the refined rows in docs/benchmarks.md; block-wise on a quarter of them.
    "gpu": {
        "budgets": "0.4,0.5,0.6,0.8",
        "calib_tokens": 1_000_000,
        "seq_len": 512,
        "blockwise_tokens": 262_144,
        "e2e_tokens": None,
        "gradient_tokens": 131_072,
        "ppl_tokens": 65_536,
        "limit": 200,
        "batch_size": 8,
    },
    "cpu": {
        "budgets": "0.5,0.6,0.8",
        "calib_tokens": 32_768,
        "seq_len": 256,
        "blockwise_tokens": 16_384,
        "e2e_tokens": None,
        "gradient_tokens": 8_192,
        "ppl_tokens": 16_384,
        "limit": 100,
        "batch_size": 8,
    },
    "tiny": {
        "budgets": "0.5,0.8",
        "calib_tokens": 2_048,
        "seq_len": 64,
        "blockwise_tokens": 1_024,
        "e2e_tokens": 1_024,
        "gradient_tokens": 512,
        "ppl_tokens": 1_024,
        "limit": 4,
        "batch_size": 4,
    },
}
PPL_SEQ_LEN = 512


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument(
        "--only",
        default="dense;nested;specialist",
        help='rows, ";"-separated: dense (with dense_t), nested, specialist or specialist=0.5,0.8',
    )
    parser.add_argument("--samplings", default="all", help="budget sampling of the nested rows, e.g. all,cycle")
    parser.add_argument("--weighting", default="sum", choices=["sum", "uncertainty"])
    parser.add_argument("--budgets", default=None, help="override the config's budgets, e.g. 0.5,0.6,0.8")
    parser.add_argument(
        "--calibration",
        default="python",
        choices=["python", "general", "both"],
        help="calibration text: the Python docs' tutorial/library/faq, the general passages, or both",
    )
    for name in (
        "calib-tokens",
        "seq-len",
        "blockwise-tokens",
        "e2e-tokens",
        "gradient-tokens",
        "ppl-tokens",
        "limit",
        "batch-size",
    ):
        parser.add_argument(f"--{name}", type=int, default=None, help="override the config's value")
    parser.add_argument(
        "--tasks", nargs="?", const=TASKS, default=None, help=f"score task accuracy (default tasks: {TASKS})"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no row that would end after this many seconds (estimated from the rows run)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="keep calibration tokens, statistics and the dense rows here, for the next invocation",
    )
    parser.add_argument("--model", default=None, help="Hub id / folder / .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON", help="combine partial results")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/nested_refine_cpu.json"))
    args = parser.parse_args()
    for key, value in CONFIGS[args.config].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.budgets = [float(b) for b in str(args.budgets).split(",")]
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("lm_eval", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.merge:
        result = merge([json.loads(p.read_text()) for p in args.merge])
        finish(result, args.out)
        return
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        # TF32 matmuls for the fp32 weights (evaluation, statistics); the training stages autocast to bf16.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    base, tok = load_model_and_tokenizer(args.model, device=device)
    base.eval()
    result: dict[str, Any] = {
        "model": args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
        "config": args.config,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "budgets": args.budgets,
        "calibration": args.calibration,
        "tasks": args.tasks.split(",") if args.tasks else [],
        "limit": args.limit if args.tasks else None,
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": [],
        "skipped": [],
    }

    def save() -> None:
        result["total_s"] = round(time.perf_counter() - started, 1)
        write_json(args.out, result)

    data = prepare(base, tok, args, device)
    result.update(data.info)
    save()
    held_out = data.held_out
    rows = plan_rows(args)
    durations: dict[str, float] = {}
    for name, options in rows:
        kind = name.split("=")[0].split("[")[0]
        estimate = durations.get(kind, 0.0)
        elapsed = time.perf_counter() - started
        if args.time_limit is not None and elapsed + estimate > args.time_limit:
            result["skipped"].append(name)
            print(f"skipping {name}: {elapsed:.0f} s + ~{estimate:.0f} s would pass --time-limit {args.time_limit:.0f}")
            save()
            continue
        t = time.perf_counter()
        entries = run_row(name, options, base, tok, data, held_out, args)
        durations[kind] = time.perf_counter() - t
        for entry in entries:
            entry["row_seconds"] = round(durations[kind], 1)
            result["rows"].append(entry)
            print(json.dumps({k: v for k, v in entry.items() if k not in ("report", "tasks")}), flush=True)
        save()
    finish(result, args.out)


class Prepared:
    """Calibration and validation blocks, statistics, held-out texts and the fitted temperature (cached)."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.held_out: dict[str, torch.Tensor] = {}


def prepare(base: Any, tok: Any, args: argparse.Namespace, device: torch.device) -> Prepared:
    data = Prepared()
    key = hashlib.sha256(
        json.dumps(
            [
                args.model,
                args.calibration,
                args.calib_tokens,
                args.seq_len,
                args.gradient_tokens,
                args.ppl_tokens,
                args.seed,
            ]
        ).encode()
    ).hexdigest()[:16]
    cache = args.cache_dir / key if args.cache_dir is not None else None
    t = time.perf_counter()
    if cache is not None and (cache / "tokens.safetensors").is_file():
        tokens = load_file(str(cache / "tokens.safetensors"))
        data.stats = ActivationStats.load(cache / "stats", device=device)
        data.gradient_stats = ActivationStats.load(cache / "gradient_stats", device=device)
        data.info = json.loads((cache / "info.json").read_text())
        data.info["statistics_cached"] = True
    else:
        tokens = {"train": None, "valid": None}
        tokens["train"], tokens["valid"] = calibration_blocks(args.calibration, tok, args)
        for name, ids in held_out_texts(tok, args).items():
            tokens[f"held_out.{name}"] = ids
        train = tokens["train"]
        s = time.perf_counter()
        data.stats = collect_activation_stats(
            base, train, max_tokens=None, seq_len=args.seq_len, batch_size=args.batch_size, show_progress=True
        )
        grad_blocks = train[: max(1, args.gradient_tokens // args.seq_len)]
        data.gradient_stats = collect_gradient_stats(
            base,
            grad_blocks,
            max_tokens=None,
            seq_len=args.seq_len,
            batch_size=max(1, args.batch_size // 2),
            show_progress=True,
        )
        statistics_s = time.perf_counter() - s
        s = time.perf_counter()
        temperature = fit_temperature(base, train, batch_size=args.batch_size)
        data.info = {
            "tokens": {
                "calibration": int(train.numel()),
                "validation": int(tokens["valid"].numel()),
                "gradient_statistics": int(grad_blocks.numel()),
                "held_out": {
                    k.split(".", 1)[1]: int(v.numel()) for k, v in tokens.items() if k.startswith("held_out.")
                },
            },
            "statistics_s": round(statistics_s, 1),
            "temperature": temperature,
            "temperature_s": round(time.perf_counter() - s, 1),
            "statistics_cached": False,
        }
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            # float64: the cached sums are bit for bit the ones this run uses.
            data.stats.save(cache / "stats", dtype=torch.float64)
            data.gradient_stats.save(cache / "gradient_stats", dtype=torch.float64)
            save_file({k: v.contiguous() for k, v in tokens.items()}, str(cache / "tokens.safetensors"))
            write_json(cache / "info.json", data.info)
            # Every invocation reads the same statistics (as stored), so rows of different calls compare exactly.
            data.stats = ActivationStats.load(cache / "stats", device=device)
            data.gradient_stats = ActivationStats.load(cache / "gradient_stats", device=device)
    data.train, data.valid = tokens["train"], tokens["valid"]
    data.held_out = {k.split(".", 1)[1]: v for k, v in tokens.items() if k.startswith("held_out.")}
    data.info["prepare_s"] = round(time.perf_counter() - t, 1)
    print(
        f"calibration {data.train.numel():,} tokens, validation {data.valid.numel():,}, temperature "
        f"{data.info['temperature']:.3f} ({data.info['prepare_s']:.0f} s)",
        flush=True,
    )
    return data


def calibration_blocks(name: str, tok: Any, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, validation)`` blocks of the calibration text (shuffled documents; 1/16 of the blocks held out)."""
    texts = []
    if name in ("python", "both"):
        texts += [t for part in PYTHON_PARTS for t in load_texts(python_docs_dir(part))]
    if name in ("general", "both"):
        for source in GENERAL_SOURCES:
            passages = general_texts(sources=[source])
            texts += passages[: len(passages) - len(passages) // 10]  # the last tenth is held out
    random.Random(args.seed).shuffle(texts)
    blocks = token_blocks(texts, tok, args.seq_len, args.calib_tokens)
    held = max(args.batch_size, round(blocks.shape[0] / 16))
    return blocks[:-held].contiguous(), blocks[-held:].contiguous()


def held_out_texts(tok: Any, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Perplexity texts no row calibrates on: the Python docs' howto/ and c-api/, and the general passages' last tenth."""
    general = []
    for source in GENERAL_SOURCES:
        passages = general_texts(sources=[source])
        general += passages[len(passages) - len(passages) // 10 :]
    random.Random(args.seed + 1).shuffle(general)
    return {
        "howto": token_stream(load_texts(python_docs_dir("howto")), tok, args.ppl_tokens),
        "c-api": token_stream(load_texts(python_docs_dir("c-api")), tok, args.ppl_tokens),
        "general": token_stream(general, tok, args.ppl_tokens),
    }


def plan_rows(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    rows: list[tuple[str, dict[str, Any]]] = []
    for item in (s.strip() for s in args.only.split(";") if s.strip()):
        name, _, value = item.partition("=")
        if name == "dense":
            rows += [("dense", {}), ("dense_t", {})]
        elif name == "nested":
            rows += [(f"nested[{s}]", {"sampling": s}) for s in args.samplings.split(",")]
        elif name == "specialist":
            budgets = [float(b) for b in value.split(",")] if value else args.budgets
            rows += [(f"specialist={b:g}", {"fraction": b}) for b in budgets]
        else:
            raise SystemExit(f"--only: unknown row {item!r} (dense, nested, specialist[=b,...])")
    return rows


def refine_config(args: argparse.Namespace, **overrides: Any) -> RefineConfig:
    return RefineConfig(
        batch_size=args.batch_size,
        blockwise_tokens=args.blockwise_tokens,
        e2e_tokens=args.e2e_tokens,
        gradient_tokens=args.gradient_tokens,
        budget_weighting=args.weighting,
        **overrides,
    )


def run_row(name: str, options: dict[str, Any], base: Any, tok: Any, data: Prepared, held_out, args) -> list[dict]:
    """The entries of one row: one per budget it serves."""
    if name in ("dense", "dense_t"):
        temperature = data.info["temperature"] if name == "dense_t" else 1.0
        entry = {"row": name, "method": name, "budget": 1.0, "temperature": temperature}
        with with_temperature(base, temperature):
            entry.update(evaluate(base, tok, data, held_out, args))
        return [entry]
    t = time.perf_counter()
    if "sampling" in options:
        config = refine_config(args, budget_sampling=options["sampling"])
        model, report = compress_and_refine(
            copy.deepcopy(base),
            data.train,
            budgets=args.budgets,
            validation=data.valid,
            stats=data.stats,
            gradient_stats=data.gradient_stats,
            config=config,
        )
        budgets = args.budgets
    else:
        config = refine_config(args)
        model, report = compress_and_refine(
            copy.deepcopy(base),
            data.train,
            options["fraction"],
            validation=data.valid,
            stats=data.stats,
            gradient_stats=data.gradient_stats,
            config=config,
        )
        budgets = [options["fraction"]]
    seconds = round(time.perf_counter() - t, 1)
    stage_seconds = dict(report.seconds)
    # With the allocation decided after block-wise refinement, the shipped candidate's block-wise time is its stage.
    stage_seconds.setdefault("blockwise", report.candidates.get(report.allocation, {}).get("blockwise_seconds", 0.0))
    model.eval()
    common = {
        "row": name,
        "method": "nested" if "sampling" in options else "specialist",
        "sampling": options.get("sampling"),
        "allocation": report.allocation,
        "compress_s": seconds,
        "seconds": stage_seconds,
        "tokens": {
            "calibration": report.calibration_tokens,
            "blockwise": (report.blockwise or {}).get("tokens", 0),
            "end_to_end": (report.end_to_end or {}).get("tokens", 0),
        },
        "report": {
            "validation_nll": report.validation_nll,
            "validation_nll_per_budget": report.validation_nll_per_budget,
            "candidates": report.candidates,
            "kl_history": (report.end_to_end or {}).get("kl_history", []),
            "point_steps": (report.end_to_end or {}).get("point_steps"),
        },
    }
    entries = []
    for budget in budgets:
        if "sampling" in options:
            model.set_rank(flops=budget)
        entry = {**common, "budget": budget}
        entry.update(evaluate(model, tok, data, held_out, args))
        entries.append(entry)
    del model
    return entries


def evaluate(model: Any, tok: Any, data: Prepared, held_out: dict[str, torch.Tensor], args) -> dict[str, Any]:
    """Held-out perplexity, validation NLL and (with ``--tasks``) task accuracy of the model as it is."""
    t = time.perf_counter()
    out: dict[str, Any] = {
        "perplexity": {
            n: evaluate_perplexity(model, ids, seq_len=PPL_SEQ_LEN, batch_size=8)["perplexity"]
            for n, ids in held_out.items()
        }
    }
    out["validation_ppl"] = evaluate_perplexity(model, data.valid, seq_len=args.seq_len, batch_size=8)["perplexity"]
    out["perplexity_s"] = round(time.perf_counter() - t, 1)
    if args.tasks:
        from nsn_peft.evaluation import evaluate_tasks

        evaluation = evaluate_tasks(model, args.tasks, tokenizer=tok, limit=args.limit, dense=False)
        point = evaluation.points[0]
        out.update(
            accuracy=point.mean,
            accuracy_stderr=point.mean_stderr,
            accuracy_chance=point.mean_chance,
            tasks={
                n: {"metric": s.metric, "value": s.value, "stderr": s.stderr, "chance": s.chance}
                for n, s in point.scores.items()
            },
            accuracy_s=round(point.seconds, 1),
        )
    return out


# -- summary ----------------------------------------------------------------------------------------------------
def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from partial ones (same configuration): rows by name and budget, the later file winning."""
    merged = copy.deepcopy(results[0])
    rows: dict[tuple, dict] = {}
    for result in results:
        for row in result["rows"]:
            rows[(row["row"], row["budget"])] = row
        for key in ("device_name", "statistics_s", "temperature"):
            merged.setdefault(key, result.get(key))
    merged["rows"] = list(rows.values())
    merged["skipped"] = sorted({s for r in results for s in r.get("skipped", [])} - {r["row"] for r in merged["rows"]})
    merged["total_s"] = sum(r.get("total_s", 0) for r in results)
    merged["merged_from"] = len(results)
    return merged


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Ratios against dense, nested against its specialist, and the ladder's time against one specialist."""
    rows = result["rows"]
    dense = next((r for r in rows if r["row"] == "dense"), None)
    summary: dict[str, Any] = {"per_budget": []}
    if dense is not None and dense.get("accuracy") is not None:
        span = dense["accuracy"] - dense["accuracy_chance"]
        for r in rows:
            if r.get("accuracy") is not None:
                r["accuracy_kept"] = (r["accuracy"] - r["accuracy_chance"]) / span if span > 1e-9 else None
    if dense is not None:
        for r in rows:
            r["ppl_vs_dense"] = {n: v / dense["perplexity"][n] for n, v in r["perplexity"].items()}
    specialists = {r["budget"]: r for r in rows if r["method"] == "specialist"}
    for r in rows:
        if r["method"] != "nested":
            continue
        item = {"sampling": r["sampling"], "budget": r["budget"], "ppl_vs_dense": r.get("ppl_vs_dense")}
        s = specialists.get(r["budget"])
        if s is not None:
            item["ppl_nested_vs_specialist"] = {n: r["perplexity"][n] / s["perplexity"][n] for n in r["perplexity"]}
            if r.get("accuracy") is not None and s.get("accuracy") is not None:
                item["accuracy_nested_minus_specialist_pp"] = (r["accuracy"] - s["accuracy"]) * 100
        summary["per_budget"].append(item)
    spec_s = [r["seconds"]["total"] for r in specialists.values()]
    for sampling in sorted({r["sampling"] for r in rows if r["method"] == "nested"}):
        ladder = next(r for r in rows if r["method"] == "nested" and r["sampling"] == sampling)
        if spec_s:
            summary.setdefault("ladder_time_vs_one_specialist", {})[sampling] = ladder["seconds"]["total"] / (
                sum(spec_s) / len(spec_s)
            )
    result["summary"] = summary
    return summary


def markdown(result: dict[str, Any]) -> str:
    summarize(result)
    texts = list(result["rows"][0]["perplexity"]) if result["rows"] else []
    tasks = bool(result.get("tasks"))
    head = (
        "| row | budget | allocation | "
        + " | ".join(f"ppl {t} (× dense)" for t in texts)
        + " | valid ppl"
        + (" | accuracy ± se | above-chance kept" if tasks else "")
        + " | tokens bw / e2e | s bw / e2e / total |"
    )
    lines = [
        f"SmolLM2-135M on {result.get('device_name')}, calibration {result.get('calibration')} "
        f"({result.get('tokens', {}).get('calibration', 0):,} tokens), fitted temperature "
        f"{result.get('temperature', float('nan')):.3f}" + (f", {result['limit']} questions per task" if tasks else ""),
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    order = {"dense": 0, "dense_t": 1, "nested": 2, "specialist": 3}
    for r in sorted(result["rows"], key=lambda r: (-r["budget"], order[r["method"]], r.get("sampling") or "")):
        label = r["row"]
        ratios = r.get("ppl_vs_dense", {})
        cells = [f"{r['perplexity'][t]:.2f} ({ratios.get(t, float('nan')):.3f})" for t in texts]
        seconds = r.get("seconds") or {}
        tok = r.get("tokens") or {}
        acc = (
            f" | {r['accuracy']:.3f} ± {r['accuracy_stderr'] or 0:.3f} | {r['accuracy_kept']:.0%}"
            if tasks and r.get("accuracy") is not None and r.get("accuracy_kept") is not None
            else (" | – | –" if tasks else "")
        )
        lines.append(
            f"| {label} | {r['budget']:g} | {r.get('allocation') or '–'} | "
            + " | ".join(cells)
            + f" | {r['validation_ppl']:.2f}"
            + acc
            + f" | {tok.get('blockwise', 0):,} / {tok.get('end_to_end', 0):,} | "
            + f"{seconds.get('blockwise', 0):.0f} / {seconds.get('end_to_end', 0):.0f} / {seconds.get('total', 0):.0f} |"
        )
    summary = result["summary"]
    if summary["per_budget"]:
        lines += ["", "Nested vs specialist at each budget (perplexity ratio per text; accuracy in points):", ""]
        for item in summary["per_budget"]:
            vs = item.get("ppl_nested_vs_specialist")
            text = ", ".join(f"{t} {v:.3f}×" for t, v in vs.items()) if vs else "no specialist"
            acc = item.get("accuracy_nested_minus_specialist_pp")
            lines.append(
                f"- {item['budget']:g} ({item['sampling']}): {text}"
                + (f"; accuracy {acc:+.1f} pp" if acc is not None else "")
            )
    for sampling, ratio in summary.get("ladder_time_vs_one_specialist", {}).items():
        lines.append(f"- ladder time ({sampling}) / one specialist's: {ratio:.2f}× (target ≤ 1.5×)")
    if result.get("skipped"):
        lines.append(f"- not run (time limit): {', '.join(result['skipped'])}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = any(r.get("accuracy") is not None for r in result["rows"])
    fig, axes = plt.subplots(1, 2 if tasks else 1, figsize=(11 if tasks else 6, 4.2), dpi=120, squeeze=False)
    text = (
        "howto"
        if any("howto" in r["perplexity"] for r in result["rows"])
        else next(iter(result["rows"][0]["perplexity"]))
    )
    panels = [("ppl_vs_dense", f"perplexity on {text} / dense")] + (
        [("accuracy", "mean zero-shot accuracy")] if tasks else []
    )
    for ax, (key, label) in zip(axes[0], panels):
        series: dict[str, list] = {}
        for r in result["rows"]:
            value = r.get(key, {}).get(text) if key == "ppl_vs_dense" else r.get("accuracy")
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if r["method"] in ("dense", "dense_t"):
                ax.axhline(value, ls="--" if r["method"] == "dense" else ":", color="black", lw=1, label=r["row"])
                continue
            name = f"nested ({r['sampling']})" if r["method"] == "nested" else "specialists"
            series.setdefault(name, []).append((r["budget"], value))
        for name, points in series.items():
            points.sort()
            ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xlabel("FLOPs budget (share of the compressed layers' dense FLOPs)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"SmolLM2-135M: one nested adapter vs one specialist per budget ({result.get('device_name')})", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def finish(result: dict[str, Any], out: Path) -> None:
    if not result["rows"]:
        write_json(out, result)
        return
    table = markdown(result)
    write_json(out, result)
    out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    plot(result, out.with_suffix(".png"))
    print()
    print(table)
    print(f"\nwrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
