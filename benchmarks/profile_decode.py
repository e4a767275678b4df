"""Where the time of one decode step goes: dense vs NSN on a Llama-3-8B-shaped model (fewer blocks), H100.

Runs Hugging Face ``generate`` (greedy, static cache, so ``generate`` compiles the decode step with
``mode="reduce-overhead"``) and eager decoding, then a ``torch.profiler`` trace of a few compiled decode
steps: the top GPU kernels, how many kernels the CPU launched one by one and how many CUDA-graph replays it
issued, and what dynamo/inductor said (recompiles, graph breaks, CUDA graphs skipped and why).

Factors are random (the speed of a matmul does not depend on its values), so no SVD is needed.

    python benchmarks/profile_decode.py --layers 8 --out results/profile_decode.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import time
from pathlib import Path

import torch
import transformers
from peft import get_peft_model

import nsn_peft
from nsn_peft.tuner.layer import NSNLinear
from nsn_peft.tuner.peft_type import checkpoint_load_scope

DEVICE = "cuda"
SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}
TINY = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
}


def build_model(layers: int) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        num_hidden_layers=layers, max_position_embeddings=8192, rope_theta=500000.0, **SHAPE
    )
    with torch.device(DEVICE):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def adapt(model, factors_only: bool):
    """NSN on every linear layer of the blocks, factors random; break-even max ranks when supported."""
    serving = "keep_base_weights" in nsn_peft.NSNConfig.__dataclass_fields__ and factors_only
    kwargs = {"max_rank": "break-even", "keep_base_weights": False} if serving else {}
    with checkpoint_load_scope():  # skip the SVD: random factors are installed below
        peft_model = get_peft_model(model, nsn_peft.NSNConfig(target_modules="all-linear", **kwargs))
    generator = torch.Generator(DEVICE).manual_seed(0)
    for layer in peft_model.modules():
        if isinstance(layer, NSNLinear):
            r, m, d = layer.nsn_max_rank["default"], layer.out_features, layer.in_features
            a = torch.randn(r, d, device=DEVICE, generator=generator, dtype=torch.bfloat16) * d**-0.5
            b = torch.randn(m, r, device=DEVICE, generator=generator, dtype=torch.bfloat16) * r**-0.5
            layer.set_factors("default", b, a)
    peft_model.eval()
    return peft_model, ("break-even, factors only" if serving else "full rank, dense kept")


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def sync_time(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def decode_ms(model, ids, new_tokens: int, compiled: bool, repeats: int = 3) -> float:
    """Milliseconds per decode step: (time for ``new_tokens`` − time for 1 token) / (new_tokens − 1)."""
    kwargs = {
        "do_sample": False,
        "cache_implementation": "static",
        "disable_compile": not compiled,
        "min_new_tokens": new_tokens,
        "pad_token_id": 0,
    }

    def run(n):
        return sync_time(lambda: model.generate(input_ids=ids, max_new_tokens=n, **{**kwargs, "min_new_tokens": n}))

    run(new_tokens)  # warm-up: compile, CUDA-graph recording
    run(new_tokens)
    samples = [(run(new_tokens) - run(1)) / (new_tokens - 1) * 1e3 for _ in range(repeats)]
    return statistics.median(samples)


def profile_steps(model, ids, new_tokens: int) -> dict:
    kwargs = {
        "do_sample": False,
        "cache_implementation": "static",
        "min_new_tokens": new_tokens,
        "max_new_tokens": new_tokens,
        "pad_token_id": 0,
    }
    model.generate(input_ids=ids, **kwargs)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        model.generate(input_ids=ids, **kwargs)
        sync()
    events = prof.key_averages()
    launches = {
        e.key: e.count
        for e in events
        if e.key in ("cudaLaunchKernel", "cudaGraphLaunch", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
    }
    gpu = sorted((e for e in events if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    top = [{"kernel": e.key[:110], "count": e.count, "ms_total": e.device_time_total / 1e3} for e in gpu[:18]]
    return {
        "launches": launches,
        "top_kernels": top,
        "table": events.table(sort_by="device_time_total", row_limit=22, max_name_column_width=90),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", default="dense,nsn")
    parser.add_argument("--fractions", default="0.5,0.25")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tiny-cpu", action="store_true", help="a tiny model on the CPU (checks the script runs)")
    args = parser.parse_args()
    global DEVICE, SHAPE
    if args.tiny_cpu:
        DEVICE, SHAPE = "cpu", TINY
    log_stream = io.StringIO()
    handler = logging.StreamHandler(log_stream)
    for name in ("torch._inductor", "torch._dynamo", "torch._inductor.cudagraph_trees"):
        logging.getLogger(name).addHandler(handler)
    torch._logging.set_logs(perf_hints=True, recompiles=True, graph_breaks=True)
    ids = torch.randint(
        0, SHAPE["vocab_size"], (1, 32), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0)
    )
    results = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "layers": args.layers,
        "nsn_peft": str(Path(nsn_peft.__file__).parent),
        "variants": {},
    }
    for variant in args.variants.split(","):
        model = build_model(args.layers)
        entries = {}
        if variant == "dense":
            points = [("dense", None)]
        else:
            model, label = adapt(model, factors_only=True)
            results["nsn_setup"] = label
            points = []
            for fraction in [float(f) for f in args.fractions.split(",")]:
                rank = model.select_rank_for_target_flops(fraction) if "dense kept" in label else None
                points.append((f"nsn@{fraction}", rank if rank is not None else fraction))
        for label, spec in points:
            if spec is not None:
                if isinstance(spec, float):
                    model.set_rank(fraction=spec)
                else:
                    model.set_rank(spec)
            before = dict(torch._dynamo.utils.counters["stats"])
            t_first = sync_time(
                lambda model=model: model.generate(
                    input_ids=ids, max_new_tokens=4, do_sample=False, cache_implementation="static", pad_token_id=0
                )
            )
            eager = decode_ms(model, ids, args.new_tokens, compiled=False, repeats=2)
            compiled = decode_ms(model, ids, args.new_tokens, compiled=True)
            prof = profile_steps(model, ids, 12)
            after = dict(torch._dynamo.utils.counters["stats"])
            entries[label] = {
                "rank": spec,
                "first_generate_s": t_first,
                "eager_ms_per_token": eager,
                "compiled_ms_per_token": compiled,
                "graphs_before": before,
                "graphs_after": after,
                "profile": {k: v for k, v in prof.items() if k != "table"},
            }
            print(
                f"== {label}: first generate {t_first:.1f}s, eager {eager:.2f} ms/token, compiled {compiled:.2f} ms/token, "
                f"dynamo {after}",
                flush=True,
            )
            print("launches (12 new tokens):", prof["launches"], flush=True)
            print(prof["table"], flush=True)
        entries["memory_gib"] = torch.cuda.memory_allocated() / 2**30 if DEVICE == "cuda" else None
        results["variants"][variant] = entries
        del model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    logs = log_stream.getvalue()
    interesting = [
        line
        for line in logs.splitlines()
        if any(k in line.lower() for k in ("skipping cudagraph", "recompil", "graph break", "cudagraph"))
    ]
    results["log_lines"] = interesting[:60]
    print("\n".join(interesting[:60]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
