"""Dense vs compressed SmolLM2-135M on a CPU, as a user runs the export: eager ``generate`` and a long prefill.

Every linear layer of the blocks (q, k, v, o, gate, up, down; 210 layers) is factored at one uniform rank that
makes the *whole model's* matmul FLOPs (LM head included) 50% or 25% of dense, or at full rank (where the export
writes the layers dense: factoring does not pay there). Each compressed model goes through ``save_compressed`` and
``load_compressed``, so what is timed is the transformers model a user loads. Factors are random: the speed of a
matmul does not depend on its values.

Workloads: batch-1 decode of 32 new tokens (greedy ``generate``, 16-token prompt), batch-8 decode, and a
512-token prefill (the first step of ``generate``: one forward pass filling the cache, logits of the last position). All models live in one process and are timed interleaved:
per repeat and workload dense, 50%, dense, 25%, dense, full, dense; each compressed run is compared with the mean of
the dense runs on either side of it, and the ratio reported is the median of those paired ratios over the repeats.
Dense is given the same setting. The load average of the machine is recorded before and after (the CPU may be shared).

Settings (``--setting``): ``eager`` (fp32, the default thread count), ``threads1`` (one intra-op thread),
``int8`` (torchao int8 weight-only on every linear layer of both models), ``bf16`` (both in bfloat16),
``compile`` (``torch.compile`` of the forward pass; decode with a static cache).

    python benchmarks/bench_cpu_decode.py --setting eager --setting int8 --out benchmarks/results/cpu_decode.json
    python benchmarks/bench_cpu_decode.py --profile --setting eager   # where a decode step's time goes
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from peft import get_peft_model
from tqdm import tqdm

import nsn_peft
from nsn_peft import NSNConfig, load_compressed, save_compressed
from nsn_peft.hub import load_model_and_tokenizer
from nsn_peft.tuner.peft_type import checkpoint_load_scope
from nsn_peft.tuner.ranks import nsn_layers

logger = logging.getLogger("bench_cpu_decode")
BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = ("eager", "threads1", "int8", "bf16", "compile")


def compressed_models(
    base: torch.nn.Module, fractions: list[float], folder: Path
) -> dict[str, tuple[torch.nn.Module, dict]]:
    """``{label: (model, info)}``: the export of ``base`` with every block linear at the rank of each FLOPs fraction."""
    with checkpoint_load_scope():  # no SVD: random factors are installed below
        nsn = get_peft_model(copy.deepcopy(base), NSNConfig(target_modules=BLOCK_LINEARS, rank_granularity=8))
    generator = torch.Generator().manual_seed(0)
    for layer in nsn_layers(nsn).values():
        r, m, d = layer.nsn_max_rank["default"], layer.out_features, layer.in_features
        layer.set_factors(
            "default",
            torch.randn(m, r, generator=generator) * r**-0.5,
            torch.randn(r, d, generator=generator) * d**-0.5,
        )
    out = {}
    for fraction in fractions:
        rank = "full" if fraction >= 1 else nsn.select_rank_for_target_flops(fraction, scope="model")
        nsn.set_rank(rank)
        report = nsn_peft.estimate_flops(nsn)
        save_compressed(nsn, folder / f"f{fraction}")
        model = load_compressed(folder / f"f{fraction}")
        label = "full rank" if fraction >= 1 else f"{fraction:.0%} FLOPs"
        dense = fraction >= 1  # the export writes every layer dense at full rank: factoring does not pay there
        out[label] = (
            model,
            {
                "rank": rank,
                "model_flops_fraction": 1.0 if dense else report.model_fraction,
                "written_dense": dense,
                "params": sum(p.numel() for p in model.parameters()),
            },
        )
    return out


def apply_setting(model: torch.nn.Module, setting: str) -> torch.nn.Module:
    if setting == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())  # every nn.Linear: the factors, the dense layers, the LM head
    elif setting == "bf16":
        model.to(torch.bfloat16)
    elif setting == "compile":
        model.forward = torch.compile(model.forward, dynamic=False)
    return model


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def workloads(vocab: int, setting: str, new_tokens: int, prefill: int) -> dict:
    g = torch.Generator().manual_seed(0)
    prompt1, prompt8 = torch.randint(0, vocab, (1, 16), generator=g), torch.randint(0, vocab, (8, 16), generator=g)
    long = torch.randint(0, vocab, (1, prefill), generator=g)
    extra = {"cache_implementation": "static"} if setting == "compile" else {}
    kwargs = {
        "do_sample": False,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "pad_token_id": 0,
        **extra,
    }

    def decode(ids):
        return lambda model: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)

    def forward(model):
        # generate's first step: the prompt through the blocks into the cache, logits of the last position only
        model(long, use_cache=True, logits_to_keep=1)

    return {"decode_b1": decode(prompt1), "decode_b8": decode(prompt8), f"prefill_{prefill}": forward}


@torch.inference_mode()
def measure(models: dict[str, torch.nn.Module], setting: str, repeats: int, new_tokens: int, prefill: int) -> dict:
    """Per repeat and workload: dense, then each compressed model followed by dense again (D C1 D C2 D C3 D), so
    every compressed run has a dense run on each side. Its ratio is the mean of those two over its own time; the
    reported ratio is the median over repeats (robust to load that comes and goes on a shared CPU)."""
    vocab = next(iter(models.values())).config.vocab_size
    jobs = workloads(vocab, setting, new_tokens, prefill)
    dense, others = models["dense"], [label for label in models if label != "dense"]
    times = {label: {name: [] for name in jobs} for label in models}
    paired = {label: {name: [] for name in jobs} for label in others}
    for model in models.values():  # warm-up (and compilation)
        for job in jobs.values():
            job(model)
    for _ in tqdm(range(repeats), desc=f"{setting}: interleaved repeats"):
        for name, job in jobs.items():
            before = timed(lambda job=job: job(dense))
            times["dense"][name].append(before)
            for label in others:
                own = timed(lambda job=job, label=label: job(models[label]))
                after = timed(lambda job=job: job(dense))
                times[label][name].append(own)
                times["dense"][name].append(after)
                paired[label][name].append((before + after) / 2 / own)
                before = after
    medians = {label: {name: statistics.median(v) for name, v in per.items()} for label, per in times.items()}
    ratios = {label: {name: statistics.median(v) for name, v in per.items()} for label, per in paired.items()}
    spread = {label: {name: [min(v), max(v)] for name, v in per.items()} for label, per in paired.items()}
    return {
        "seconds_median": medians,
        "seconds_all": times,
        "dense_over_compressed": ratios,
        "dense_over_compressed_range": spread,
        "paired_ratios": paired,
    }


def profile(model: torch.nn.Module, label: str, setting: str, rows: int = 14) -> dict:
    """Self CPU time by operator of one 8-token batch-1 ``generate`` (after a warm-up)."""
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    kwargs = {"do_sample": False, "max_new_tokens": 8, "min_new_tokens": 8, "pad_token_id": 0}
    with torch.inference_mode():
        model.generate(input_ids=ids, **kwargs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model.generate(input_ids=ids, **kwargs)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(
        e.self_cpu_time_total
        for e in events
        if e.key
        in ("aten::addmm", "aten::mm", "aten::bmm", "aten::_weight_int8pack_mm", "aten::linear", "aten::matmul")
    )
    top = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in events[:rows]]
    print(f"\n{label} ({setting}): {total / 1e3:.1f} ms for 8 tokens, matmuls {100 * matmul / total:.0f}%")
    for row in top:
        print(f"  {row['op']:<40} {row['calls']:>6} calls {row['self_ms']:>9.1f} ms")
    return {"total_ms": total / 1e3, "matmul_share": matmul / total, "top": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", action="append", choices=SETTINGS, help="repeatable; default: eager")
    parser.add_argument("--fractions", default="0.5,0.25,1.0", help="whole-model matmul FLOPs fractions")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="print and record an operator profile of a decode")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    default_threads = torch.get_num_threads()
    base, _ = load_model_and_tokenizer(None, dtype="float32")
    fractions = [float(f) for f in args.fractions.split(",")]
    results = {
        "model": "SmolLM2-135M-Instruct (embedded)",
        "layers_factored": "q,k,v,o,gate,up,down of every block",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "new_tokens": args.new_tokens,
        "prefill": args.prefill,
        "repeats": args.repeats,
        "settings": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        built = compressed_models(base, fractions, Path(tmp))
        results["points"] = {label: info for label, (_model, info) in built.items()}
        for setting in args.setting or ["eager"]:
            torch.set_num_threads(1 if setting == "threads1" or args.threads == 1 else default_threads)
            models = {"dense": apply_setting(copy.deepcopy(base), setting)}
            models.update(
                {label: apply_setting(copy.deepcopy(model), setting) for label, (model, _info) in built.items()}
            )
            entry = {"threads": torch.get_num_threads(), "load_average_before": os.getloadavg()}
            if args.profile:
                entry["profile"] = {
                    label: profile(models[label], label, setting) for label in ("dense", "50% FLOPs") if label in models
                }
            entry.update(measure(models, setting, args.repeats, args.new_tokens, args.prefill))
            entry["load_average_after"] = os.getloadavg()
            results["settings"][setting] = entry
            print(
                f"\n{setting} ({entry['threads']} threads, load average {entry['load_average_before'][0]:.1f} → "
                f"{entry['load_average_after'][0]:.1f}): dense / compressed, median of {args.repeats} interleaved runs"
            )
            for label, ratios in entry["dense_over_compressed"].items():
                print(f"  {label:<12} " + "  ".join(f"{k} {v:.2f}×" for k, v in ratios.items()))
            del models
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
