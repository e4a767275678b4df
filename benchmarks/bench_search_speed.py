"""ε search on a CPU: keeping each layer's eigenbases across the bisection steps, against decomposing again.

Calibrates SmolLM2-135M on the Python tutorial, then runs :func:`nsn_peft.search_ranks` (projected init, all
linear layers, perplexity on held-out HOWTO text within ε) twice in this process: with the decomposition cache
off (``cache_bytes=0``: both eigendecompositions of every layer at every step) and on (the default). Both must
choose the same plan; the ratio is the speed-up. Time inside ``eval_fn`` (perplexity) is reported apart, since
only the decompositions change. Prints the table and writes JSON::

    python benchmarks/bench_search_speed.py --out benchmarks/results/search_speed_cpu.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from nsn_peft import collect_activation_stats, evaluate_perplexity, search_ranks
from nsn_peft.data import load_texts, python_docs_dir, token_blocks, token_stream
from nsn_peft.hub import load_model_and_tokenizer
from nsn_peft.io import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--epsilon", type=float, default=0.02)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search_speed_cpu.json"))
    args = parser.parse_args()
    base, tok = load_model_and_tokenizer(device=args.device)
    calib = token_blocks(load_texts(python_docs_dir("tutorial")), tok, 512, args.calib_tokens)
    eval_ids = token_stream(load_texts(python_docs_dir("howto")), tok, args.eval_tokens)
    t = time.perf_counter()
    stats = collect_activation_stats(base, calib, max_tokens=None, batch_size=4, show_progress=False)
    calib_s = time.perf_counter() - t
    eval_seconds = [0.0]

    def ppl(model) -> float:
        start = time.perf_counter()
        value = evaluate_perplexity(model, eval_ids, seq_len=512, batch_size=4, show_progress=False)["perplexity"]
        eval_seconds[0] += time.perf_counter() - start
        return value

    dense = ppl(base)
    rows, plans = [], []
    for label, cache_bytes in (("decompose every step", 0), ("eigenbases kept (default)", 2 * 1024**3)):
        eval_seconds[0] = 0.0
        start = time.perf_counter()
        plan = search_ranks(
            base,
            stats,
            ppl,
            args.epsilon,
            baseline=dense,
            max_steps=args.max_steps,
            show_progress=False,
            cache_bytes=cache_bytes,
        )
        total = time.perf_counter() - start
        plans.append(plan)
        rows.append(
            {
                "variant": label,
                "cache_bytes": cache_bytes,
                "total_s": total,
                "eval_s": eval_seconds[0],
                "decompose_s": total - eval_seconds[0],
                "metric": plan.target["metric"],
            }
        )
        print(
            f"{label:28s} {total:7.1f} s  (perplexity {eval_seconds[0]:6.1f} s, the rest {total - eval_seconds[0]:6.1f} s)",
            flush=True,
        )
    same = plans[0].ranks == plans[1].ranks and plans[0].kept_dense == plans[1].kept_dense
    speedup = rows[0]["total_s"] / rows[1]["total_s"]
    outside_eval = rows[0]["decompose_s"] / rows[1]["decompose_s"]
    print(f"speed-up {speedup:.2f}x overall, {outside_eval:.2f}x outside perplexity; same plan: {same}")
    write_json(
        args.out,
        {
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized, fp32)",
            "device": args.device,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "calibration_tokens": int(calib.numel()),
            "calibration_text": "tutorial/",
            "eval_text": "howto/ (held out)",
            "eval_tokens": int(eval_ids.numel()),
            "epsilon": args.epsilon,
            "max_steps": args.max_steps,
            "init": "projected",
            "target_modules": "all-linear",
            "dense_ppl": dense,
            "calibration_s": calib_s,
            "rows": rows,
            "same_plan": same,
            "speedup": speedup,
            "speedup_outside_eval": outside_eval,
        },
    )


if __name__ == "__main__":
    main()
