"""DDP equivalence of multi-rank training: 1 process vs N processes with the same global batch.

Trains a tiny random Llama (NSN on the MLP) with :class:`nsn_peft.training.NSNTrainer` twice — once in
one process with the whole global batch, once under ``torchrun --nproc_per_node N`` with ``global/N`` per
process — and compares the loss curves step by step (combined objective, per-rank losses and
log-variances). Then the checkpoint written by the DDP run is loaded on CPU with
``PeftModel.from_pretrained`` and compared with the single-process one.

Usage (the driver launches both runs itself through ``python -m torch.distributed.run``)::

    python benchmarks/ddp_equivalence.py --device cpu --nproc 2 --steps 20 --out ddp_cpu.json   # gloo
    python benchmarks/ddp_equivalence.py --device cuda --nproc 2 --steps 50 --out ddp_cuda.json  # nccl
    python benchmarks/ddp_equivalence.py --device cuda --nproc 2 --steps 50 --fsdp --out fsdp.json

The worker (``--worker``) can also be started by hand, e.g. under ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger("ddp_equivalence")

TARGETS = ["up_proj", "gate_proj", "down_proj"]


def tiny_model(seed: int, hidden: int, layers: int, vocab: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(config)


class MarkovDataset(torch.utils.data.Dataset):
    """Sequences from a fixed sparse random Markov chain: learnable, so loss curves move."""

    def __init__(self, num: int, length: int, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        successors = torch.randint(0, vocab, (vocab, 3), generator=g)
        data = torch.empty(num, length, dtype=torch.long)
        data[:, 0] = torch.randint(0, vocab, (num,), generator=g)
        for t in range(1, length):
            pick = torch.randint(0, 3, (num,), generator=g)
            data[:, t] = successors[data[:, t - 1], pick]
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def build_peft(args):
    from peft import get_peft_model

    import nsn_peft

    base = tiny_model(args.seed, args.hidden, args.layers, args.vocab)
    config = nsn_peft.NSNConfig(target_modules=TARGETS, rank_granularity=args.granularity)
    return get_peft_model(base, config)


def exit_worker() -> None:
    """End a torchrun worker: tear the process group down in order, then leave without interpreter finalization.

    With gloo, C++ worker threads that outlive ``destroy_process_group`` can abort the process (SIGABRT,
    "terminate called without an active exception") while the interpreter shuts down, after all the work is
    done and written; the launcher would report the run as failed (seen in about 1 of 4 CPU runs).
    """
    from nsn_peft.training.distributed import end_distributed

    end_distributed()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def worker(args) -> None:
    from transformers import TrainingArguments

    from nsn_peft.training import NSNTrainer, SandwichRankSampler

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by the {world} processes")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model = build_peft(args)
    train = MarkovDataset(args.global_batch * args.steps, args.seq_len, args.vocab, seed=args.seed + 1)
    targs = TrainingArguments(
        output_dir=args.run_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.global_batch // world,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.steps,
        report_to=[],
        seed=args.seed,
        use_cpu=args.device == "cpu",
        ddp_backend=("gloo" if args.device == "cpu" else "nccl") if world > 1 else None,
        dataloader_drop_last=True,
        disable_tqdm=True,
        max_grad_norm=1.0,
        **(
            {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
            if args.fsdp and world > 1
            else {}
        ),
    )
    trainer = NSNTrainer(
        model,
        targs,
        train_dataset=train,
        rank_sampler=SandwichRankSampler(args.num_random),
        distill_alpha=args.distill_alpha,
        backward_per_rank=not args.single_graph,
        weighting=args.weighting,
    )
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    param = next(p for n, p in trainer.model_wrapped.named_parameters() if "nsn_A" in n)
    wrapper = type(trainer.model_wrapped).__name__
    if trainer.is_world_process_zero():
        steps = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
        result = {
            "world_size": world,
            "device": str(trainer.args.device),
            "per_device_batch": args.global_batch // world,
            "find_unused_parameters": trainer.args.ddp_find_unused_parameters,
            "fsdp_enabled": bool(trainer.is_fsdp_enabled),
            "wrapped_model": wrapper,
            "nsn_param_type": type(param.data).__name__,
            "train_seconds": elapsed,
            "log": steps,
            "final_log_vars": trainer.rank_loss.log_vars.detach().cpu().tolist(),
            "checkpoint": str(Path(args.run_dir) / f"checkpoint-{args.steps}"),
        }
        (Path(args.run_dir) / "curve.json").write_text(json.dumps(result, indent=2))


def run_workers(
    script: str, nproc: int, flags: list[str], run_dir: Path, env: dict | None = None, label: str = ""
) -> dict:
    """Run ``script --worker --run-dir run_dir *flags`` in ``nproc`` processes (torchrun); its ``curve.json`` plus
    the wall time. Shared by the DDP and FSDP/ZeRO-3 equivalence scripts."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        script,
        "--worker",
        "--run-dir",
        str(run_dir),
        *flags,
    ]
    env = {**os.environ, **(env or {})}
    env.setdefault("OMP_NUM_THREADS", "1")
    logger.info("Launching: %s", " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
        raise SystemExit(f"{nproc}-process run{f' ({label})' if label else ''} failed with exit code {proc.returncode}")
    result = json.loads((run_dir / "curve.json").read_text())
    result["wall_seconds"] = time.perf_counter() - start
    return result


def _launch(args, nproc: int, run_dir: Path) -> dict:
    flags = []
    for key in (
        "device",
        "steps",
        "global_batch",
        "seq_len",
        "hidden",
        "layers",
        "vocab",
        "granularity",
        "lr",
        "seed",
        "num_random",
        "distill_alpha",
        "weighting",
    ):
        flags += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    flags += ["--fsdp"] * bool(args.fsdp) + ["--single-graph"] * bool(args.single_graph)
    return run_workers(__file__, nproc, flags, run_dir)


def _series(log: list[dict]) -> dict[str, list[float]]:
    keys = sorted({k for h in log for k in h if k == "loss" or k.startswith(("loss@", "logvar@", "distill@"))})
    return {k: [h.get(k, math.nan) for h in log] for k in keys}


def compare_checkpoints(args, single: dict, multi: dict) -> dict:
    """Load both final checkpoints on CPU with PeftModel.from_pretrained and compare their outputs."""
    from peft import PeftModel

    import nsn_peft

    batch = MarkovDataset(4, args.seq_len, args.vocab, seed=args.seed + 99).data
    outputs = {}
    ranks = None
    for name, run in (("single", single), ("ddp", multi)):
        base = tiny_model(args.seed, args.hidden, args.layers, args.vocab)
        model = PeftModel.from_pretrained(base, run["checkpoint"]).to("cpu").eval()
        ranks = nsn_peft.selectable_ranks(model)
        outputs[name] = {}
        with torch.no_grad():
            for r in (ranks[0], ranks[-1]):
                with nsn_peft.at_rank(model, r):
                    outputs[name][r] = model(batch).logits.float()
        state = json.loads((Path(run["checkpoint"]) / "nsn_multirank_state.json").read_text())
        outputs[name]["log_vars"] = state["log_vars"]
    diffs = {
        f"max_abs_logit_diff@r={r}": (outputs["single"][r] - outputs["ddp"][r]).abs().max().item()
        for r in (ranks[0], ranks[-1])
    }
    diffs["log_vars_single"] = outputs["single"]["log_vars"]
    diffs["log_vars_ddp"] = outputs["ddp"]["log_vars"]
    diffs["loaded_on"] = "cpu"
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the DDP run")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--granularity", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-random", type=int, default=1)
    parser.add_argument("--distill-alpha", type=float, default=0.0)
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the multi-process run with FSDP2 (needs GPUs: Accelerate enables FSDP only on them; "
        "fsdp_equivalence.py compares FSDP2 and ZeRO-3 in more depth, on CPU too)",
    )
    parser.add_argument("--single-graph", action="store_true", help="NSNTrainer(backward_per_rank=False)")
    parser.add_argument("--weighting", choices=["uncertainty", "sum"], default="uncertainty")
    parser.add_argument("--tol", type=float, default=1e-3, help="max relative difference of the loss curves to pass")
    parser.add_argument("--out", default="ddp_equivalence.json")
    parser.add_argument("--work-dir", default=None, help="where both runs write (default: a temporary folder)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if args.worker:
        worker(args)
        exit_worker()
        return
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} needs {args.nproc} GPUs, found {torch.cuda.device_count()}")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="nsn_ddp_"))
    single = _launch(args, 1, work / "np1")
    multi = _launch(args, args.nproc, work / f"np{args.nproc}")
    a, b = _series(single["log"]), _series(multi["log"])
    comparison = {}
    worst = 0.0
    for key in a:
        pairs = [(x, y) for x, y in zip(a[key], b.get(key, [])) if not (math.isnan(x) or math.isnan(y))]
        if not pairs:
            continue
        abs_diff = max(abs(x - y) for x, y in pairs)
        rel_diff = max(abs(x - y) / max(abs(x), 1e-8) for x, y in pairs)
        comparison[key] = {"max_abs_diff": abs_diff, "max_rel_diff": rel_diff, "points": len(pairs)}
        if key == "loss" or key.startswith("loss@"):
            worst = max(worst, rel_diff)
    checkpoints = compare_checkpoints(args, single, multi)
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "run_dir")},
        "torch": torch.__version__,
        "single": single,
        "ddp": multi,
        "comparison": comparison,
        "max_rel_loss_diff": worst,
        "checkpoint_check": checkpoints,
        "passed": worst <= args.tol,
    }
    from nsn_peft.io import write_json

    write_json(args.out, result)
    print(f"\n{'step':>4} | {'loss 1 proc':>12} | {f'loss {args.nproc} procs':>12} | rel diff")
    for i, (x, y) in enumerate(zip(a["loss"], b["loss"])):
        print(f"{i + 1:>4} | {x:12.6f} | {y:12.6f} | {abs(x - y) / max(abs(x), 1e-8):.2e}")
    print(
        f"\nmax relative difference of loss / loss@r curves: {worst:.2e} (tolerance {args.tol:g}) -> "
        f"{'PASS' if result['passed'] else 'FAIL'}"
    )
    print(
        f"DDP checkpoint loaded on CPU; logits vs single-process run: "
        f"{ {k: f'{v:.2e}' for k, v in checkpoints.items() if k.startswith('max_abs')} }"
    )
    print(f"results: {args.out}")
    if not result["passed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
