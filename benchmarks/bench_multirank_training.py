"""One nested model trained for several FLOPs budgets vs the dense model finetuned on the same tokens.

SmolLM2-135M, NSN on the MLP (``gate_proj``, ``up_proj``, ``down_proj``), whitened init. A budget schedule
(:func:`nsn_peft.plan_budget_schedule`) gives nested per-layer ranks at 25/50/75/100% of the MLP's dense FLOPs:
the loss-weighted mixed schedule or the uniform one, whichever has the lower mean NLL on validation text (held
out from the training text) before training. Every run sees the same training tokens (``--steps`` ×
``--batch-size`` × ``--block-size``) of the Python docs except ``howto/``; perplexity is measured on held-out
``howto/`` text for:

* the dense model, and the dense model with its MLP finetuned on the same tokens (plain cross-entropy) — the
  baseline every budget is compared with;
* the nested model before training, at each budget;
* the nested model trained with ``NSNTrainer(budgets=..., distill_teacher="dense")``: every budget at every step,
  loss ``(1-α)·CE + α·KL(dense ‖ model)`` with the frozen dense model as teacher, uncertainty-weighted;
* one specialist per budget: the same init and recipe, trained at that budget only.

Targets: at 50% of the MLP FLOPs <= 1.35x the finetuned dense perplexity, at 75% <= 1.10x, every budget within
5% of its specialist.

    python benchmarks/bench_multirank_training.py --device cuda --out benchmarks/results/multirank_training.json
    python benchmarks/bench_multirank_training.py --device cpu --steps 3 --batch-size 2 --block-size 64 \\
        --eval-tokens 1024 --calib-tokens 512 --out /tmp/bench.json                          # CPU smoke test

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
from nsn_peft.calibrate.collect import collect_activation_stats, collect_gradient_stats
from nsn_peft.data import token_blocks
from nsn_peft.evaluation import perplexity as _perplexity
from nsn_peft.hub import load_model_and_tokenizer
from nsn_peft.io import atomic_path, write_json, write_text
from nsn_peft.planning import plan_budget_schedule
from nsn_peft.refine import mean_nll
from nsn_peft.training import (
    NSNTrainer,
    TokenBlocks,
    activation_checkpointing_kwargs,
    clear_dequantized_gguf_marker,
    read_texts,
)

logger = logging.getLogger("bench_multirank")

DOCS = Path(os.environ.get("NSN_PEFT_PYTHON_DOCS", "/usr/share/doc/python3.11/html/_sources"))
TARGETS = ["up_proj", "gate_proj", "down_proj"]
TARGET_RATIOS = {0.5: 1.35, 0.75: 1.10}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench_multirank_training.json")
    p.add_argument("--model", default=None, help="model id/folder/.gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--train-data", nargs="+", default=[str(DOCS)], help="text folders/files for training")
    p.add_argument("--exclude", nargs="*", default=["howto"], help="folder names left out of the training data")
    p.add_argument("--eval-data", default=str(DOCS / "howto"), help="held-out text")
    p.add_argument("--budgets", default="0.25,0.5,0.75,1.0", help="FLOPs budgets (fractions of the MLP's dense FLOPs)")
    p.add_argument(
        "--schedule",
        choices=["auto", "mixed", "uniform"],
        default="auto",
        help="auto: the schedule with the lower validation NLL before training",
    )
    p.add_argument("--granularity", type=int, default=32, help="rank granularity of the schedules")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every run (the token budget)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--logvar-lr", type=float, default=5e-2, help="learning rate of the log-variances")
    p.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the KL to the dense teacher")
    p.add_argument("--calib-tokens", type=int, default=131072, help="training tokens for the activation statistics")
    p.add_argument("--gradient-tokens", type=int, default=32768, help="training tokens for the gradient statistics")
    p.add_argument("--valid-blocks", type=int, default=32, help="training-pool blocks held out to choose the schedule")
    p.add_argument("--no-specialists", action="store_true")
    p.add_argument("--no-dense-training", action="store_true")
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
    budgets = sorted(float(b) for b in args.budgets.split(","))
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.parent / (out.stem + "_runs")
    phases: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
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
    pool = token_blocks(
        texts,
        tokenizer,
        args.block_size,
        max_tokens=(args.steps * args.batch_size + args.valid_blocks) * args.block_size,
    )
    valid_blocks, train_blocks = pool[: args.valid_blocks], pool[args.valid_blocks :]
    eval_blocks = token_blocks(read_texts(args.eval_data), tokenizer, args.block_size, max_tokens=args.eval_tokens)
    if len(train_blocks) < args.steps * args.batch_size:
        logger.warning(
            "Only %d training blocks for %d steps x %d: the data repeats",
            len(train_blocks),
            args.steps,
            args.batch_size,
        )
    train_set = TokenBlocks(train_blocks)
    t = mark("load model + data", t)

    dense_ppl = perplexity(dense, eval_blocks, args.eval_batch_size, autocast)
    calib = train_blocks[: max(1, args.calib_tokens // args.block_size)]
    stats = collect_activation_stats(
        dense,
        calib,
        max_tokens=None,
        seq_len=args.block_size,
        batch_size=args.eval_batch_size,
        target_modules=TARGETS,
        show_progress=False,
    )
    grads = collect_gradient_stats(
        dense,
        train_blocks[: max(1, args.gradient_tokens // args.block_size)],
        max_tokens=None,
        seq_len=args.block_size,
        batch_size=4,
        target_modules=TARGETS,
        show_progress=False,
    )
    schedules = {
        kind: plan_budget_schedule(
            dense,
            stats,
            budgets,
            target_modules=TARGETS,
            gradient_stats=grads,
            allocation=kind,
            granularity=args.granularity,
            device=device,
            show_progress=False,
        )
        for kind in ("mixed", "uniform")
    }
    t = mark("dense eval + statistics + schedules", t)

    # Choose the schedule on validation text before any training (mixed only when it is better).
    probe = get_peft_model(
        copy.deepcopy(dense), nsn_peft.NSNConfig(target_modules=TARGETS, init="whitened", stats=stats)
    ).eval()
    choice_nll = {}
    for kind, schedule in schedules.items():
        values = []
        for b in budgets:
            with nsn_peft.at_rank(probe, schedule.plans[b]):
                values.append(mean_nll(probe, valid_blocks, args.eval_batch_size))
        choice_nll[kind] = {"mean": sum(values) / len(values), "per_budget": dict(zip(map(str, budgets), values))}
    del probe
    if args.schedule == "auto":
        chosen = "mixed" if choice_nll["mixed"]["mean"] < choice_nll["uniform"]["mean"] else "uniform"
    else:
        chosen = args.schedule
    schedule = schedules[chosen]
    logger.info("schedule: %s (validation NLL %s)", chosen, {k: round(v["mean"], 4) for k, v in choice_nll.items()})
    t = mark("schedule choice", t)

    def make_nsn():
        model = copy.deepcopy(dense)
        return get_peft_model(model, nsn_peft.NSNConfig(stats=stats, **schedule.to_config_kwargs()))

    def ppl_at(model, points) -> dict[float, float]:
        result = {}
        for b in points:
            with nsn_peft.at_rank(model, flops=b):
                result[b] = perplexity(model, eval_blocks, args.eval_batch_size, autocast)
        return result

    partial: dict[str, Any] = {
        "config": vars(args),
        "complete": False,
        "budgets": budgets,
        "schedule": chosen,
        "schedule_validation_nll": choice_nll,
        "dense_ppl": dense_ppl,
        "phases_seconds": phases,
    }
    out.parent.mkdir(parents=True, exist_ok=True)

    def save_partial(**items: Any) -> None:
        """Everything measured so far, so a run cut short keeps it."""
        partial.update(items)
        write_json(out, partial)

    model = make_nsn()
    before = ppl_at(model, budgets)
    save_partial(ppl_before={str(b): v for b, v in before.items()})
    flops = {b: nsn_peft.estimate_flops(model, schedule.plans[b]).targeted_fraction for b in budgets}
    del model
    release_memory()
    t = mark("NSN init + eval before training", t)

    def run(name: str, model, trainer_cls=NSNTrainer, **kwargs) -> tuple[Any, dict]:
        meter = Throughput(min(args.throughput_warmup, max(args.steps - 1, 0)))
        trainer = trainer_cls(
            model, training_args(args, work / name, device), train_dataset=train_set, callbacks=[meter], **kwargs
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        per_step = meter.seconds_per_step() or seconds / max(args.steps, 1)
        info = {
            "train_seconds": round(seconds, 2),
            "seconds_per_step": per_step,
            "tokens_per_second": tokens_per_step / per_step,
            "train_tokens": args.steps * tokens_per_step,
            "log_history": [h for h in trainer.state.log_history if "loss" in h],
        }
        return trainer, info

    recipe = {"distill_teacher": "dense", "distill_alpha": args.distill_alpha}
    model = make_nsn()
    trainer, nested = run(
        "nested", model, budgets=budgets, weighting="uncertainty", logvar_learning_rate=args.logvar_lr, **recipe
    )
    nested["ppl"] = ppl_at(model, budgets)
    nested["log_vars"] = dict(zip(trainer.bucket_labels(), trainer.rank_loss.log_vars.detach().tolist()))
    del trainer, model
    release_memory()
    t = mark("nested", t)
    save_partial(
        nested={k: v for k, v in nested.items() if k != "ppl"}, ppl_nested={str(b): v for b, v in nested["ppl"].items()}
    )

    specialists: dict[float, dict] = {}
    for b in [] if args.no_specialists else budgets:
        model = make_nsn()
        trainer, info = run(f"specialist-{b:g}", model, budgets=[b], weighting="sum", **recipe)
        info["ppl"] = ppl_at(model, [b])[b]
        specialists[b] = info
        del trainer, model
        release_memory()
        t = mark(f"specialist {b:g}", t)
        save_partial(ppl_specialists={str(k): v["ppl"] for k, v in specialists.items()})

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
        t = mark("dense MLP finetuning", t)
        save_partial(dense_mlp_finetuned_ppl=info["ppl"])

    # -- report -------------------------------------------------------------------------------------
    baseline = dense_run["ppl"] if dense_run else None
    rows = []
    for b in budgets:
        ranks = list(schedule.plans[b].values())
        row = {
            "budget": b,
            "mlp_flops_fraction": flops[b],
            "mean_rank": sum(ranks) / len(ranks),
            "min_rank": min(ranks),
            "max_rank": max(ranks),
            "ppl_before": before[b],
            "ppl_nested": nested["ppl"][b],
            "ppl_specialist": specialists[b]["ppl"] if b in specialists else None,
            "nested_over_finetuned_dense": nested["ppl"][b] / baseline if baseline else None,
            "nested_over_dense": nested["ppl"][b] / dense_ppl,
        }
        if row["ppl_specialist"]:
            row["nested_over_specialist"] = row["ppl_nested"] / row["ppl_specialist"]
        rows.append(row)
    targets: dict[str, Any] = {}
    for b, goal in TARGET_RATIOS.items():
        row = next((r for r in rows if abs(r["budget"] - b) < 1e-9), None)
        if row and row["nested_over_finetuned_dense"] is not None:
            targets[f"at_{b:g}_le_{goal}x_finetuned_dense"] = {
                "ratio": row["nested_over_finetuned_dense"],
                "met": row["nested_over_finetuned_dense"] <= goal,
            }
    ratios = [r["nested_over_specialist"] for r in rows if "nested_over_specialist" in r]
    if ratios:
        targets["within_5pct_of_specialists"] = {"worst_ratio": max(ratios), "met": max(ratios) <= 1.05}
    total = time.perf_counter() - t_start
    gpu_train = (
        nested["train_seconds"]
        + sum(s["train_seconds"] for s in specialists.values())
        + (dense_run or {}).get("train_seconds", 0)
    )
    result = {
        "complete": True,
        "config": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "targets_layers": TARGETS,
        "train_tokens_per_run": args.steps * tokens_per_step,
        "train_blocks_available": len(train_blocks),
        "eval_tokens": int(eval_blocks.numel()),
        "statistics_tokens": {
            "activation": int(calib.numel()),
            "gradient": int(min(args.gradient_tokens, train_blocks.numel())),
        },
        "budgets": budgets,
        "schedule": chosen,
        "schedule_validation_nll": choice_nll,
        "schedule_plans": {kind: {str(b): s.plans[b] for b in budgets} for kind, s in schedules.items()},
        "dense_ppl": dense_ppl,
        "dense_mlp_finetuned": dense_run,
        "rows": rows,
        "nested": nested,
        "specialists": {str(k): v for k, v in specialists.items()},
        "targets": targets,
        "phases_seconds": phases,
        "training_gpu_seconds": round(gpu_train, 1),
        "total_seconds": round(total, 1),
    }
    write_json(out, result)
    markdown = render_markdown(result)
    write_text(out.with_suffix(".md"), markdown)
    plot(result, out.with_suffix(".png"))
    print(markdown)
    print(f"\nJSON: {out}  table: {out.with_suffix('.md')}  plot: {out.with_suffix('.png')}  total {total:.0f} s")


def render_markdown(res: dict) -> str:
    fin = res["dense_mlp_finetuned"]
    lines = [
        f"### One nested model for four FLOPs budgets, SmolLM2-135M, NSN on the MLP ({res['schedule']} schedule), "
        f"{res['train_tokens_per_run']:,} training tokens per run, {res['device']}",
        "",
        f"Held-out `howto/` perplexity ({res['eval_tokens']:,} tokens). Dense: {res['dense_ppl']:.2f}"
        + (f"; **dense MLP finetuned on the same tokens: {fin['ppl']:.2f}** (the baseline)" if fin else ""),
        "",
        "| budget (MLP FLOPs) | mean rank | before training | nested (one model) | × finetuned dense | specialist | nested / specialist |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in res["rows"]:
        spec = f"{row['ppl_specialist']:.2f}" if row["ppl_specialist"] else "–"
        ratio = f"{row['nested_over_specialist']:.3f}" if "nested_over_specialist" in row else "–"
        vs = f"{row['nested_over_finetuned_dense']:.2f}×" if row["nested_over_finetuned_dense"] else "–"
        lines.append(
            f"| {row['budget']:.0%} ({row['mlp_flops_fraction']:.3f}) | {row['mean_rank']:.0f} | {row['ppl_before']:.2f} | "
            f"{row['ppl_nested']:.2f} | {vs} | {spec} | {ratio} |"
        )
    lines += ["", "| run | tokens | GPU s | tokens/s |", "|---|---:|---:|---:|"]
    n = res["nested"]
    lines.append(
        f"| nested (4 budgets per step + dense teacher) | {n['train_tokens']:,} | {n['train_seconds']:.0f} | {n['tokens_per_second']:,.0f} |"
    )
    for b, info in res["specialists"].items():
        lines.append(
            f"| specialist {float(b):.0%} | {info['train_tokens']:,} | {info['train_seconds']:.0f} | {info['tokens_per_second']:,.0f} |"
        )
    if fin:
        lines.append(
            f"| dense MLP finetuning | {fin['train_tokens']:,} | {fin['train_seconds']:.0f} | {fin['tokens_per_second']:,.0f} |"
        )
    lines += ["", "Targets:"]
    for name, t in res["targets"].items():
        value = t.get("ratio", t.get("worst_ratio"))
        lines.append(f"- {name}: {value:.3f} -> {'met' if t['met'] else 'missed'}")
    lines.append(f"\nTotal time {res['total_seconds']:.0f} s; phases: {res['phases_seconds']}")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [row["mlp_flops_fraction"] for row in res["rows"]]
    ax.plot(x, [row["ppl_before"] for row in res["rows"]], "o:", color="gray", label="nested, before training")
    ax.plot(x, [row["ppl_nested"] for row in res["rows"]], "o-", label="nested (one model), trained")
    spec = [(row["mlp_flops_fraction"], row["ppl_specialist"]) for row in res["rows"] if row["ppl_specialist"]]
    if spec:
        ax.plot(*zip(*spec), "s--", label="specialist per budget")
    ax.axhline(res["dense_ppl"], color="black", lw=1, label="dense")
    if res["dense_mlp_finetuned"]:
        ax.axhline(
            res["dense_mlp_finetuned"]["ppl"], color="black", lw=1, ls="--", label="dense MLP finetuned (same tokens)"
        )
    ax.set_yscale("log")
    ax.set_xlabel("MLP FLOPs vs dense")
    ax.set_ylabel("held-out perplexity (howto/)")
    ax.set_title(f"SmolLM2-135M budget schedule ({res['train_tokens_per_run']:,} tokens/run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
