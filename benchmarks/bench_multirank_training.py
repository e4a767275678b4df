"""Multi-rank finetuning of SmolLM2-135M vs single-rank specialists, at a fixed token budget.

NSN on the MLP (``up_proj``, ``gate_proj``, ``down_proj``) with max rank = full (576), SVD or whitened
init. Every run sees the same training tokens (``--steps`` x ``--batch-size`` x ``--block-size``) from the
Python docs (all sources except ``howto``), and perplexity is measured on held-out ``howto`` text for:

* the dense model (and, as a reference, the dense model with its MLP weights finetuned on the same budget);
* the NSN model before training, at 25/50/75/100 % of the max rank and at the rank of 50 % MLP FLOPs;
* the nested model trained with the multi-rank objective (``NSNTrainer``), at the same ranks;
* single-rank specialists: one fresh NSN model per rank, trained with the same budget at that rank only.

Targets: nested within 10 % of each specialist's perplexity; at 50 % of MLP FLOPs <= 1.5x dense perplexity.
Training throughput (tokens/s) of the multi-rank run, of each specialist and of plain training of the same
layers at full rank (dense MLP weights trainable, no NSN) is measured in the same process.

    python benchmarks/bench_multirank_training.py --device cuda --out results.json            # on an H100
    python benchmarks/bench_multirank_training.py --device cpu --steps 3 --batch-size 2 \\
        --block-size 64 --eval-tokens 1024 --calib-tokens 512 --out /tmp/bench.json          # CPU smoke test

Writes ``--out`` (JSON), a markdown table next to it (``.md``) and a plot (``.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Optional

import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import nsn_peft
from nsn_peft.calibrate.collect import collect_activation_stats
from nsn_peft.data import token_blocks
from nsn_peft.evaluation import perplexity as _perplexity
from nsn_peft.hub import load_model_and_tokenizer
from nsn_peft.io import atomic_path, write_json, write_text
from nsn_peft.training import (
    FixedRankSampler,
    NSNTrainer,
    activation_checkpointing_kwargs,
    clear_dequantized_gguf_marker,
    make_rank_sampler,
)
from nsn_peft.training._lm_data import TokenBlocks, read_texts

logger = logging.getLogger("bench_multirank")

DOCS = Path(os.environ.get("NSN_PEFT_PYTHON_DOCS", "/usr/share/doc/python3.11/html/_sources"))
TARGETS = ["up_proj", "gate_proj", "down_proj"]
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench_multirank_training.json")
    p.add_argument("--model", default=None, help="model id/folder/.gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--train-data", nargs="+", default=[str(DOCS)], help="text folders/files for training")
    p.add_argument("--exclude", nargs="*", default=["howto"], help="folder names left out of the training data")
    p.add_argument("--eval-data", default=str(DOCS / "howto"), help="held-out text")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every run (the token budget)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--logvar-lr", type=float, default=5e-2, help="learning rate of the log-variances")
    p.add_argument("--init", choices=["svd", "whitened"], default="whitened")
    p.add_argument("--calib-tokens", type=int, default=65536, help="training tokens for the whitened init's statistics")
    p.add_argument("--samplers", default="sandwich",
                   help="comma list of nested runs: sandwich, uniform, fixed-eval (all evaluation ranks each step)")
    p.add_argument("--num-random", type=int, default=2, help="random middle ranks per step (sandwich) / ranks (uniform)")
    p.add_argument("--weighting", choices=["uncertainty", "sum"], default="uncertainty")
    p.add_argument("--distill-alpha", type=float, default=0.0)
    p.add_argument("--specialist-ranks", default="eval", help="'eval' (the evaluation ranks), 'none', or a comma list")
    p.add_argument("--no-dense-training", action="store_true", help="skip the plain full-rank training reference")
    p.add_argument("--eval-tokens", type=int, default=131072)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--throughput-warmup", type=int, default=5, help="steps excluded from the tokens/s timing")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="Trainer output folders (default: next to --out)")
    return p.parse_args()


class Throughput(TrainerCallback):
    """Wall time of the optimizer steps after ``warmup`` (device-synchronised)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: Optional[float] = None
        self.end: Optional[float] = None
        self.steps = 0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup and self.start is None:
            self._sync()
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None:
            self._sync()
            self.end = time.perf_counter()
            self.steps = state.global_step - self.warmup

    def seconds_per_step(self) -> Optional[float]:
        if self.start is None or self.end is None or self.steps <= 0:
            return None
        return (self.end - self.start) / self.steps




def training_args(args, run_dir: Path, device: torch.device) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(run_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        weight_decay=0.0,
        logging_steps=max(1, args.steps // 30),
        save_strategy="no",
        bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
        **activation_checkpointing_kwargs(args.activation_checkpointing),
        use_cpu=device.type == "cpu",
        report_to=[],
        seed=args.seed,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def perplexity(model, blocks: torch.Tensor, batch_size: int, autocast: Optional[torch.dtype]) -> float:
    """Held-out perplexity over the token blocks (:func:`nsn_peft.evaluation.perplexity`), bf16 autocast on GPUs."""
    device = next(model.parameters()).device
    context = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with context:
        return _perplexity(model, blocks, seq_len=blocks.shape[1], batch_size=batch_size)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    autocast = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.parent / (out.stem + "_runs")
    phases: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - since, 2)
        logger.info("%s: %.1f s (total %.1f s)", name, now - since, now - t_start)
        return now

    t = time.perf_counter()
    dense, tokenizer = load_model_and_tokenizer(args.model)
    clear_dequantized_gguf_marker(dense)
    dense.to(device)
    texts = read_texts(args.train_data, exclude=args.exclude)
    random.Random(args.seed).shuffle(texts)
    tokens_per_step = args.batch_size * args.block_size
    train_blocks = token_blocks(texts, tokenizer, args.block_size, max_tokens=args.steps * tokens_per_step)
    eval_blocks = token_blocks(read_texts(args.eval_data), tokenizer, args.block_size, max_tokens=args.eval_tokens)
    if len(train_blocks) < args.steps * args.batch_size:
        logger.warning("Only %d training blocks for %d steps x %d: the data repeats", len(train_blocks), args.steps, args.batch_size)
    train_set = TokenBlocks(train_blocks)
    t = mark("load model + data", t)

    dense_ppl = perplexity(dense, eval_blocks, args.eval_batch_size, autocast)
    stats = None
    if args.init == "whitened":
        calib = train_blocks[: max(1, args.calib_tokens // args.block_size)]
        stats = collect_activation_stats(
            dense, calib, max_tokens=None, seq_len=args.block_size, batch_size=args.eval_batch_size, target_modules=TARGETS,
            show_progress=False,
        )
    t = mark("dense eval + calibration", t)

    def make_nsn():
        model = copy.deepcopy(dense)
        return get_peft_model(model, nsn_peft.NSNConfig(target_modules=TARGETS, init=args.init, stats=stats))

    model = make_nsn()
    grid = nsn_peft.selectable_ranks(model)
    top = grid[-1]
    fraction_ranks = {f: max([r for r in grid if r <= f * top + 1e-9] or [grid[0]]) for f in FRACTIONS}
    flops50_rank = int(nsn_peft.select_rank_for_target_flops(model, 0.5))
    eval_ranks = sorted(set(fraction_ranks.values()) | {flops50_rank})
    flops = {r: nsn_peft.estimate_flops(model, r).targeted_fraction for r in eval_ranks}

    def ppl_at(model, ranks) -> dict[int, float]:
        result = {}
        for r in ranks:
            with nsn_peft.at_rank(model, r):
                result[r] = perplexity(model, eval_blocks, args.eval_batch_size, autocast)
        return result

    before = ppl_at(model, eval_ranks)
    del model
    release_memory()
    t = mark("NSN init + eval before training", t)

    def run(name: str, model, trainer_cls=NSNTrainer, **kwargs) -> tuple[Any, dict]:
        meter = Throughput(min(args.throughput_warmup, max(args.steps - 1, 0)))
        trainer = trainer_cls(model, training_args(args, work / name, device), train_dataset=train_set, callbacks=[meter], **kwargs)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        per_step = meter.seconds_per_step() or seconds / max(args.steps, 1)
        info = {
            "train_seconds": round(seconds, 2),
            "seconds_per_step": per_step,
            "tokens_per_second": tokens_per_step / per_step,
            "log_history": [h for h in trainer.state.log_history if "loss" in h],
        }
        return trainer, info

    nested: dict[str, dict] = {}
    for sampler_name in [s.strip() for s in args.samplers.split(",") if s.strip()]:
        if sampler_name == "fixed-eval":
            sampler = FixedRankSampler(eval_ranks, seed=args.seed)
        else:
            sampler = make_rank_sampler(sampler_name, seed=args.seed, num_random=args.num_random, num_ranks=max(args.num_random, 1))
        model = make_nsn()
        trainer, info = run(
            f"nested-{sampler_name}", model, rank_sampler=sampler, weighting=args.weighting,
            logvar_learning_rate=args.logvar_lr, distill_alpha=args.distill_alpha, eval_ranks=eval_ranks,
        )
        passes = sum(len(sampler.sample(s)) for s in range(args.steps)) / max(args.steps, 1)
        info.update(
            sampler=repr(sampler), rank_passes_per_step=passes, ppl=ppl_at(model, eval_ranks),
            log_vars=dict(zip(trainer.rank_buckets.labels, trainer.rank_loss.log_vars.detach().tolist())),
            rank_counts=trainer.rank_counts,
        )
        nested[sampler_name] = info
        del trainer, model
        release_memory()
        t = mark(f"nested ({sampler_name})", t)

    if args.specialist_ranks == "eval":
        specialist_ranks = eval_ranks
    elif args.specialist_ranks == "none":
        specialist_ranks = []
    else:
        specialist_ranks = sorted({int(r) for r in args.specialist_ranks.split(",")})
    specialists: dict[int, dict] = {}
    for r in specialist_ranks:
        model = make_nsn()
        trainer, info = run(f"specialist-{r}", model, rank_sampler=FixedRankSampler([r]), weighting="sum", eval_ranks=[r])
        info["ppl"] = ppl_at(model, [r])[r]
        specialists[r] = info
        del trainer, model
        release_memory()
        t = mark(f"specialist r={r}", t)

    dense_run = None
    if not args.no_dense_training:
        model = copy.deepcopy(dense)
        for name, param in model.named_parameters():
            param.requires_grad = name.rsplit(".", 2)[-2] in TARGETS
        trainer, info = run("dense-mlp", model, trainer_cls=Trainer)
        info["ppl"] = perplexity(model, eval_blocks, args.eval_batch_size, autocast)
        info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        dense_run = info
        del trainer, model
        release_memory()
        t = mark("dense MLP training", t)

    # -- report -------------------------------------------------------------------------------------
    rows = []
    for r in eval_ranks:
        fractions = [f for f, fr in fraction_ranks.items() if fr == r]
        row = {
            "rank": r,
            "percent_of_max_rank": [int(100 * f) for f in fractions],
            "rank_fraction": r / top,
            "mlp_flops_fraction": flops[r],
            "is_50pct_flops_rank": r == flops50_rank,
            "ppl_before": before[r],
            "ppl_nested": {k: v["ppl"][r] for k, v in nested.items()},
            "ppl_specialist": specialists[r]["ppl"] if r in specialists else None,
        }
        if row["ppl_specialist"]:
            row["nested_over_specialist"] = {k: v / row["ppl_specialist"] for k, v in row["ppl_nested"].items()}
        rows.append(row)
    targets: dict[str, Any] = {}
    for name, info in nested.items():
        ratios = {r["rank"]: r["nested_over_specialist"][name] for r in rows if "nested_over_specialist" in r}
        at50 = info["ppl"][flops50_rank] / dense_ppl
        targets[name] = {
            "within_10pct_of_specialists": all(v <= 1.10 for v in ratios.values()) if ratios else None,
            "worst_ratio_to_specialist": max(ratios.values()) if ratios else None,
            "ppl_at_50pct_flops_over_dense": at50,
            "at_50pct_flops_le_1.5x_dense": at50 <= 1.5,
        }
    total = time.perf_counter() - t_start
    result = {
        "config": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "train_tokens_per_run": args.steps * tokens_per_step,
        "train_blocks_available": len(train_blocks),
        "eval_tokens": int(eval_blocks.numel()),
        "grid": grid,
        "fraction_ranks": {str(int(100 * f)): r for f, r in fraction_ranks.items()},
        "rank_at_50pct_mlp_flops": flops50_rank,
        "dense_ppl": dense_ppl,
        "dense_mlp_finetuned": dense_run,
        "rows": rows,
        "nested": nested,
        "specialists": {str(k): v for k, v in specialists.items()},
        "targets": targets,
        "phases_seconds": phases,
        "total_seconds": round(total, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    markdown = render_markdown(result)
    write_text(out.with_suffix(".md"), markdown)
    plot(result, out.with_suffix(".png"))
    print(markdown)
    print(f"\nJSON: {out}  table: {out.with_suffix('.md')}  plot: {out.with_suffix('.png')}  total {total:.0f} s")


def render_markdown(res: dict) -> str:
    names = list(res["nested"])
    lines = [
        f"### Multi-rank finetuning, SmolLM2-135M, NSN on MLP (init={res['config']['init']}), "
        f"{res['train_tokens_per_run']:,} training tokens per run, {res['device']}",
        "",
        f"Held-out perplexity ({res['eval_tokens']:,} tokens). Dense model: **{res['dense_ppl']:.2f}**"
        + (f"; dense with MLP finetuned on the same budget: {res['dense_mlp_finetuned']['ppl']:.2f}" if res["dense_mlp_finetuned"] else ""),
        "",
        "| rank | % of max rank | MLP FLOPs vs dense | before training | "
        + " | ".join(f"nested ({n})" for n in names) + " | specialist | nested / specialist |",
        "|---:|---:|---:|---:|" + "---:|" * len(names) + "---:|---:|",
    ]
    for row in res["rows"]:
        pct = "/".join(f"{p}%" for p in row["percent_of_max_rank"]) or f"{100 * row['rank_fraction']:.0f}%"
        tag = " (50% FLOPs)" if row["is_50pct_flops_rank"] else ""
        spec = f"{row['ppl_specialist']:.2f}" if row["ppl_specialist"] else "–"
        ratio = ", ".join(f"{v:.3f}" for v in row.get("nested_over_specialist", {}).values()) or "–"
        nested = " | ".join(f"{row['ppl_nested'][n]:.2f}" for n in names)
        lines.append(
            f"| {row['rank']}{tag} | {pct} | {row['mlp_flops_fraction']:.3f} | {row['ppl_before']:.2f} | {nested} | {spec} | {ratio} |"
        )
    lines += ["", "| run | tokens/s | s/step | rank passes/step |", "|---|---:|---:|---:|"]
    for name, info in res["nested"].items():
        lines.append(f"| nested ({name}) | {info['tokens_per_second']:,.0f} | {info['seconds_per_step']:.3f} | {info['rank_passes_per_step']:.2f} |")
    for rank, info in res["specialists"].items():
        lines.append(f"| specialist r={rank} | {info['tokens_per_second']:,.0f} | {info['seconds_per_step']:.3f} | 1 |")
    if res["dense_mlp_finetuned"]:
        info = res["dense_mlp_finetuned"]
        lines.append(f"| plain dense MLP training (no NSN) | {info['tokens_per_second']:,.0f} | {info['seconds_per_step']:.3f} | 1 |")
    lines += ["", "Targets:"]
    for name, t in res["targets"].items():
        worst = t["worst_ratio_to_specialist"]
        lines.append(
            f"- nested ({name}): within 10% of every specialist: {t['within_10pct_of_specialists']} "
            f"(worst ratio {worst:.3f})" if worst is not None else f"- nested ({name}): no specialists run"
        )
        lines.append(
            f"- nested ({name}): at 50% MLP FLOPs (rank {res['rank_at_50pct_mlp_flops']}) ppl = "
            f"{t['ppl_at_50pct_flops_over_dense']:.2f}x dense -> <= 1.5x: {t['at_50pct_flops_le_1.5x_dense']}"
        )
    lines.append(f"\nTotal time {res['total_seconds']:.0f} s; phases: {res['phases_seconds']}")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ranks = [row["rank"] for row in res["rows"]]
    ax.plot(ranks, [row["ppl_before"] for row in res["rows"]], "o:", color="gray", label="NSN before training")
    for name in res["nested"]:
        ax.plot(ranks, [row["ppl_nested"][name] for row in res["rows"]], "o-", label=f"nested ({name})")
    spec = [(row["rank"], row["ppl_specialist"]) for row in res["rows"] if row["ppl_specialist"]]
    if spec:
        ax.plot(*zip(*spec), "s--", label="single-rank specialists")
    ax.axhline(res["dense_ppl"], color="black", lw=1, label="dense")
    ax.axhline(1.5 * res["dense_ppl"], color="black", lw=1, ls="--", label="1.5x dense")
    ax.axvline(res["rank_at_50pct_mlp_flops"], color="red", lw=0.8, ls=":", label="50% MLP FLOPs")
    ax.set_yscale("log")
    ax.set_xlabel("rank (MLP layers)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"SmolLM2-135M multi-rank finetuning ({res['train_tokens_per_run']:,} tokens/run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
