"""The utilized-rank pipeline end to end: calibrate → choose per-layer ranks → projected factors → compress → reload.

1. collect activation statistics XᵀX of every linear layer on calibration text;
2. choose per-layer ranks — within a FLOPs budget (``--target-fraction``) from the statistics and the loss
   gradients of the layers' outputs (one backward pass over part of the calibration text), or within a
   perplexity tolerance (``--epsilon``) by measuring held-out perplexity;
3. build the NSN adapter with the plan's initialisation: the utilized-rank projection ``W' = P_T W P_S`` at the
   searched energies (ε mode, ``init="projected"``) or activation-whitened factors at the allocated ranks
   (budget mode, ``init="whitened"``);
4. save it as a compressed model, load it back and check that it computes the same perplexity.

Writes ``stats/``, ``rank_plan.json``, ``compressed/`` and ``summary.json`` to ``--output-dir``. Runs offline: the
default model is the embedded SmolLM2-135M-Instruct, calibration text the Python tutorial, evaluation text the
Python HOWTOs (both installed with Python).

    # on an H100
    python examples/utilized_rank_pipeline.py --device cuda --target-fraction 0.6 --output-dir runs/utilized
    # quick CPU run on a local model
    python examples/utilized_rank_pipeline.py --model ./tiny-model --calib-data train.txt --eval-data valid.txt \\
        --target-fraction 0.6 --granularity 16 --seq-len 16 --calib-tokens 512 --eval-tokens 256

The CLI equivalent: ``nsn-peft calibrate``, ``search-ranks``, ``adapt --rank-plan --stats``, ``compress``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger("utilized_rank_pipeline")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model id/folder/.gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--calib-data", default=None, help="calibration text (default: the Python tutorial sources)")
    p.add_argument("--eval-data", default=None, help="held-out text (default: the Python HOWTO sources)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--target-fraction", type=float, default=None, help="FLOPs budget vs dense (default mode: 0.6)")
    mode.add_argument("--epsilon", type=float, default=None, help="allowed relative perplexity increase instead")
    p.add_argument("--granularity", type=int, default=64, help="rank grid step")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-tokens", type=int, default=65536)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--output-dir", default="runs/utilized_rank")
    args = p.parse_args(argv)
    if args.target_fraction is None and args.epsilon is None:
        args.target_fraction = 0.6
    if args.target_fraction is not None and not 0 < args.target_fraction <= 1:
        p.error("--target-fraction must be in (0, 1]")
    if args.epsilon is not None and args.epsilon <= 0:
        p.error("--epsilon must be > 0")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    import torch
    from peft import get_peft_model

    import nsn_peft
    from nsn_peft.calibrate.collect import collect_activation_stats, collect_gradient_stats
    from nsn_peft.data import load_texts, python_docs_dir
    from nsn_peft.evaluation import perplexity
    from nsn_peft.export.compressed import load_compressed, save_compressed
    from nsn_peft.hub import load_model_and_tokenizer
    from nsn_peft.io import write_json
    from nsn_peft.planning.allocate import allocate_ranks_for_budget
    from nsn_peft.planning.search import search_ranks

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    calib = load_texts(args.calib_data or python_docs_dir("tutorial"))
    held_out = load_texts(args.eval_data or python_docs_dir("howto"))
    base, tokenizer = load_model_and_tokenizer(args.model, device=device)

    def ppl(model: Any) -> float:
        return perplexity(
            model,
            held_out,
            tokenizer=tokenizer,
            seq_len=args.seq_len,
            max_tokens=args.eval_tokens,
            batch_size=args.batch_size,
            device=device,
        )

    dense = ppl(base)
    logger.info("dense perplexity %.3f", dense)

    # 1. activation statistics
    stats = collect_activation_stats(
        base,
        calib,
        tokenizer=tokenizer,
        max_tokens=args.calib_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        device=device,
    )
    stats.save(out / "stats")

    # 2. per-layer ranks
    if args.epsilon is not None:
        plan = search_ranks(base, stats, ppl, args.epsilon)
    else:
        # Output-gradient statistics weigh each layer's truncation error by its effect on the loss.
        grads = collect_gradient_stats(
            base,
            calib,
            tokenizer=tokenizer,
            max_tokens=min(args.calib_tokens, 16384),
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            device=device,
        )
        plan = allocate_ranks_for_budget(base, stats, args.target_fraction, gradient_stats=grads)
    plan.save(out / "rank_plan.json")

    # 3. factors at those ranks (the plan carries its init, target modules, ranks and energies)
    config = nsn_peft.NSNConfig(
        stats_path=str(out / "stats"), rank_granularity=args.granularity, **plan.to_config_kwargs()
    )
    model = get_peft_model(base, config).eval()
    report = model.estimate_flops()
    compressed_ppl = ppl(model)

    # 4. compress, reload, check
    save_compressed(model, out / "compressed")
    reloaded = load_compressed(out / "compressed", device=device)
    reloaded_ppl = ppl(reloaded)

    summary = {
        "model": args.model or "embedded SmolLM2-135M-Instruct",
        "mode": "epsilon" if args.epsilon is not None else "budget",
        "target": args.epsilon if args.epsilon is not None else args.target_fraction,
        "init": plan.init,
        "factored_layers": len(plan.ranks),
        "dense_layers": len(plan.kept_dense),
        "dense_perplexity": dense,
        "compressed_perplexity": compressed_ppl,
        "reloaded_perplexity": reloaded_ppl,
        "model_flops_fraction": report.model_fraction,
        "targeted_flops_fraction": report.targeted_fraction,
    }
    write_json(out / "summary.json", summary)
    print(f"dense perplexity       {dense:10.3f}")
    print(f"compressed perplexity  {compressed_ppl:10.3f}  at {report.model_fraction:.3f} of dense FLOPs")
    print(f"reloaded perplexity    {reloaded_ppl:10.3f}  ({out / 'compressed'})")
    return summary


if __name__ == "__main__":
    main()
