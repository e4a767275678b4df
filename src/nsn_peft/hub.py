"""Loading anything a user can point at: a base model, an NSN adapter, or a compressed export.

A reference is a Hub id, a local folder, a ``.gguf`` file, or the embedded SmolLM2 default (``None``; a standard
transformers folder in a cache, see :mod:`nsn_peft.gguf_models`); an adapter folder names its base model in
``adapter_config.json``. Errors name the file and what was expected.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .devices import DeviceMap, dispatch, placement_kwargs, refuse_disk, resolve_device, resolve_dtype
from .errors import NoTokenizerError
from .gguf_models import clear_dequantized_gguf_marker, embedded_model_dir, fetch_embedded_model, is_embedded_reference
from .io import local_or_hub_folder, looks_like_hub_id
from .tuner.loading import from_pretrained

logger = logging.getLogger(__name__)

# Kept for old scripts: the embedded model as it was once referenced (still accepted everywhere).
DEFAULT_MODEL = "embedded:smollm2-135m"

TASKS = ("causal-lm", "sequence-classification")

__all__ = [
    "DEFAULT_MODEL",
    "base_model_reference",
    "check_adapter_files",
    "embedded_model_dir",
    "fetch_adapter",
    "fetch_embedded_model",
    "fetch_hub_export",
    "is_compressed_folder",
    "load_adapter",
    "load_compressed_model",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "read_adapter_config",
]


def _resolve(name_or_path: Optional[Union[str, os.PathLike]], gguf_file: Optional[str]) -> tuple[str, Optional[str]]:
    """``(folder or id, gguf_file)`` that transformers can load: the embedded model resolved, ``x.gguf`` split."""
    if is_embedded_reference(name_or_path):
        if name_or_path is not None:
            logger.info("%s refers to the embedded SmolLM2-135M-Instruct", name_or_path)
        return str(embedded_model_dir()), None
    path = Path(name_or_path).expanduser()
    if is_compressed_folder(path):
        raise ValueError(
            f"{path} is a compressed export (written by save_compressed / `nsn-peft compress`), not a base model "
            "to adapt: its layers are already factored. Load it with nsn_peft.load_compressed(...) or "
            "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) (CLI: eval/infer --model accept it); "
            "to train or adapt again, start from the adapter it came from"
        )
    if str(name_or_path).endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if gguf_file is not None and path.exists() and not (path / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file '{gguf_file}' not found in {path}")
    return str(path) if path.exists() else str(name_or_path), gguf_file


def _check_loading_info(model: Any, info: dict[str, Any], source: str, task: str, allow_missing_weights: bool) -> None:
    """Fail on weights the checkpoint lacks (they would be random); warn about weights it has but the model does not.

    transformers only logs these (and the CLI hides its logs); a model with random layers would train, evaluate
    and save without a word. A classifier head missing from a causal-LM checkpoint is expected and only logged.
    """
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    if missing and task == "sequence-classification":
        prefix = f"{getattr(model, 'base_model_prefix', '')}."
        head = [k for k in missing if not k.startswith(prefix)]
        if head:
            logger.info("New classification head (trained from scratch): %s", head)
        missing = [k for k in missing if k.startswith(prefix)]
    if missing:
        message = (
            f"{source} lacks {len(missing)} weight(s) of {type(model).__name__} (they would be random): "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
        )
        if not allow_missing_weights:
            raise ValueError(
                message + "; is it a checkpoint of another architecture, or incomplete? "
                "(allow_missing_weights=True loads it anyway)"
            )
        logger.warning(message)
    if unexpected:
        logger.warning(
            "%s holds %d weight(s) that %s does not use (ignored): %s%s",
            source,
            len(unexpected),
            type(model).__name__,
            ", ".join(unexpected[:4]),
            " ..." if len(unexpected) > 4 else "",
        )


def load_model(
    name_or_path: Optional[Union[str, os.PathLike]] = None,
    *,
    gguf_file: Optional[str] = None,
    task: str = "causal-lm",
    dtype: Optional[Union[str, torch.dtype]] = None,
    device: Optional[Union[str, torch.device]] = None,
    allow_missing_weights: bool = False,
    device_map: Optional[DeviceMap] = None,
    max_memory: Optional[dict] = None,
    offload_folder: Optional[str] = None,
    **model_kwargs: Any,
):
    """A base model from a Hub id, folder, ``.gguf`` file or the embedded default (``None``); ``device_map``: accelerate's.

    ``None`` is the embedded SmolLM2-135M-Instruct (a standard transformers folder, see
    :func:`nsn_peft.gguf_models.embedded_model_dir`). A path ending in ``.gguf`` is split into folder +
    ``gguf_file``; GGUF weights are dequantized and lose transformers' "quantized" marker, so ``Trainer`` trains
    them and merged models save. A checkpoint that lacks weights of the model raises ``ValueError`` (naming
    them) unless ``allow_missing_weights``; a compressed export raises ``ValueError`` before anything is loaded.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    source, gguf_file = _resolve(name_or_path, gguf_file)
    kwargs = dict(model_kwargs)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    kwargs.update(placement_kwargs(device_map, max_memory, offload_folder))
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    logger.info("Loading %s%s", source, f" ({gguf_file})" if gguf_file else "")
    model, info = auto.from_pretrained(source, output_loading_info=True, **kwargs)
    shown = str(Path(source) / gguf_file) if gguf_file else source
    _check_loading_info(model, info, shown, task, allow_missing_weights)
    if gguf_file is not None:
        clear_dequantized_gguf_marker(model)
        # Name the file, not just its folder: adapters record this, and the folder alone does not load.
        model.config._name_or_path = shown
        if "name_or_path" in vars(model):
            model.name_or_path = shown
    if device is not None and device_map is None:
        model = model.to(resolve_device(device))
    model.eval()
    return model


def load_tokenizer(name_or_path: Optional[Union[str, os.PathLike]] = None, *, gguf_file: Optional[str] = None):
    """The tokenizer of a model reference (as :func:`load_model` resolves it); ``pad_token`` set to EOS if unset."""
    from transformers import AutoTokenizer

    source, gguf_file = _resolve(name_or_path, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        if (
            Path(source).is_dir()
            and gguf_file is None
            and not any(
                (Path(source) / n).is_file()
                for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
            )
        ):
            raise NoTokenizerError(f"{source} holds no tokenizer; pass one (tokenizer=... / --tokenizer)") from None
        raise ValueError(f"cannot load the tokenizer of {source}: {' '.join(str(err).split())}") from err
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(
    name_or_path: Optional[Union[str, os.PathLike]] = None,
    *,
    gguf_file: Optional[str] = None,
    tokenizer: Optional[Union[str, os.PathLike]] = None,
    task: str = "causal-lm",
    dtype: Optional[Union[str, torch.dtype]] = None,
    device: Optional[Union[str, torch.device]] = None,
    **model_kwargs: Any,
):
    """``(model, tokenizer)``: :func:`load_model` and the tokenizer of ``tokenizer`` or else of the same source.

    ``name_or_path=None`` is the embedded SmolLM2-135M-Instruct; GGUF files embed their tokenizer.
    """
    model = load_model(name_or_path, gguf_file=gguf_file, task=task, dtype=dtype, device=device, **model_kwargs)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else load_tokenizer(name_or_path, gguf_file=gguf_file)
    return model, tok


def base_model_reference(ref: Optional[Union[str, os.PathLike]], gguf_file: Optional[str] = None) -> str:
    """The base-model reference to record in an adapter: absolute for local paths, the GGUF file included.

    The embedded model is recorded as its converted folder, which ``PeftModel``/``AutoPeftModelForCausalLM``
    load like any folder (and which :func:`load_adapter` finds again on a machine whose cache lies elsewhere).
    """
    if is_embedded_reference(ref):
        return str(embedded_model_dir())
    path = Path(ref).expanduser()
    if path.exists():
        path = path.resolve()
        if gguf_file and path.is_dir():
            return str(path / gguf_file)
        return str(path)
    return str(ref)


# What an adapter on the Hub is read for: its config, its factors, a tokenizer saved beside them, its card.
ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template*",
)


def fetch_adapter(ref: Union[str, os.PathLike]) -> Path:
    """The local folder of an adapter reference: a path as it is, a Hub id downloaded (its adapter files only)."""
    return local_or_hub_folder(ref, list(ADAPTER_FILES), what="NSN adapter")


def fetch_hub_export(ref: Optional[Union[str, os.PathLike]]) -> Optional[Path]:
    """For a Hub id of a compressed export, its downloaded folder (the files a compressed model needs); ``None`` for
    anything else (local paths, other models, or a Hub that cannot be reached: then transformers reports it)."""
    if ref is None or not looks_like_hub_id(ref):
        return None
    import huggingface_hub

    from .export.compressed import HUB_FILES

    try:
        config = json.loads(
            Path(huggingface_hub.hf_hub_download(repo_id=str(ref), filename="config.json")).read_text(encoding="utf-8")
        )
    except Exception:  # noqa: BLE001  (not reachable, or no config: not an export we can tell apart)
        return None
    if not isinstance(config, dict) or "nsn_ranks" not in config:
        return None
    return local_or_hub_folder(ref, list(HUB_FILES), what="compressed model")


def read_adapter_config(folder: Union[str, os.PathLike]) -> dict[str, Any]:
    """``adapter_config.json`` of an NSN adapter folder (or Hub id); a clear error naming the folder if it is not one."""
    from .tuner.registration import check_config_fields, finish_interrupted_adapter_save

    folder = fetch_adapter(folder)
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

    folder = fetch_adapter(folder)
    config = read_adapter_config(folder)
    weights = folder / "adapter_model.safetensors"
    if weights.exists() or not (folder / "adapter_model.bin").is_file():
        if not weights.is_file():
            raise FileNotFoundError(
                f"{folder} has adapter_config.json but no adapter_model.safetensors (an incomplete copy?)"
            )
        check_safetensors(weights)
    return config


def _check_recorded_base(adapter: Union[str, os.PathLike], ref: Optional[str]) -> None:
    """A clear error, before any loading, when the base model an adapter records cannot be found here."""
    where = Path(adapter) / "adapter_config.json"
    if not ref:
        raise ValueError(
            f"{where} records no base model (base_model_name_or_path); pass the base model (model= / --model)"
        )
    if is_embedded_reference(ref):
        return
    path = Path(str(ref)).expanduser()
    if path.is_absolute() and not path.exists():
        raise FileNotFoundError(
            f"the base model recorded in {where} is not on this machine: {ref}; pass it (model= / --model), or set "
            "base_model_name_or_path to a Hub id before sharing the adapter"
        )


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
    keep_base_weights: Optional[bool] = None,
    device_map: Optional[DeviceMap] = None,
    max_memory: Optional[dict] = None,
):
    """``(peft_model, tokenizer, base_ref)`` of a saved NSN adapter (``device_map``: GPUs and CPU, not disk).

    The base model is ``model`` when given, else the one the adapter records. The tokenizer is ``tokenizer``,
    else one saved beside the adapter, else the base model's.

    ``keep_base_weights`` overrides the adapter's saved setting. ``False`` serves from the factors only: when
    the base model is a folder of safetensors files, the dense weights of adapted layers are never read (the
    model is built empty, the factors are loaded, then every other weight is read from the checkpoint), so
    memory never exceeds the final size by more than one tensor. Other base models (``.gguf``, ``.bin``, Hub
    ids) are loaded whole first and each adapted layer's dense weight is freed as its factors arrive.
    """
    adapter = fetch_adapter(adapter)  # a Hub id: its adapter files only
    config = check_adapter_files(adapter)  # before the base model: a broken adapter fails in milliseconds
    ref = model if model is not None else config.get("base_model_name_or_path")
    if model is None:
        _check_recorded_base(adapter, ref)
    if task is None:
        task = "sequence-classification" if config.get("task_type") == "SEQ_CLS" else "causal-lm"
    if tokenizer is None and (Path(adapter) / "tokenizer_config.json").is_file():
        tokenizer = adapter  # saved beside the adapter
    keep = config.get("keep_base_weights", True) if keep_base_weights is None else keep_base_weights
    shards = _safetensors_shards(ref) if not keep and gguf_file is None else []
    if shards:
        peft_model, tok = _load_factors_only(
            ref,
            shards,
            adapter,
            tokenizer=tokenizer,
            task=task,
            dtype=dtype,
            device=None if device_map is not None else device,
            trainable=trainable,
        )
        peft_model = dispatch(peft_model, device_map, max_memory) if device_map is not None else peft_model
    else:
        base, tok = load_model_and_tokenizer(
            ref,
            gguf_file=gguf_file,
            tokenizer=tokenizer,
            task=task,
            dtype=dtype,
            device=device,
            **placement_kwargs(device_map, max_memory),
        )
        refuse_disk(base, str(ref))
        peft_model = from_pretrained(base, str(adapter), is_trainable=trainable, keep_base_weights=keep_base_weights)
    if not trainable:
        peft_model.eval()
    return peft_model, tok, ref


def _safetensors_shards(ref: Optional[Union[str, os.PathLike]]) -> list[Path]:
    """The safetensors files of a local model folder (single file or sharded), else ``[]``."""
    if ref is None or str(ref) == DEFAULT_MODEL:
        return []
    folder = Path(ref).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"corrupt {index}: {err}") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def _load_factors_only(ref, shards: list[Path], adapter, *, tokenizer, task: str, dtype, device, trainable: bool):
    """Build the base model empty, load the NSN factors, then read only the weights the factors do not replace."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    model_config = AutoConfig.from_pretrained(str(ref))
    with init_empty_weights(include_buffers=False):  # parameters on the meta device; buffers (rotary tables) real
        base = auto.from_config(model_config, **({"dtype": torch_dtype} if torch_dtype is not None else {}))
    target = torch.device(device) if device is not None else torch.device("cpu")
    logger.info("Loading %s for serving from factors only (dense weights of adapted layers are not read)", ref)
    peft_model = from_pretrained(
        base, str(adapter), is_trainable=trainable, keep_base_weights=False, torch_device=str(target)
    )
    inner = peft_model.get_base_model()
    # Checkpoint keys are the plain model's names; inside an adapted layer the base weights sit under "base_layer".
    missing = {n.replace(".base_layer", ""): n for n, p in inner.named_parameters(remove_duplicate=False) if p.is_meta}
    for shard in shards:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open handles have no __iter__)
                name = missing.pop(key, None)
                if name is None:
                    continue  # a dense weight the factors replace, or a key this model does not have
                value = f.get_tensor(key)
                set_module_tensor_to_device(inner, name, target, value=value, dtype=torch_dtype or value.dtype)
    inner.tie_weights()
    still = [n for n, p in inner.named_parameters() if p.is_meta]
    if still:
        raise ValueError(
            f"{ref}: the checkpoint has no weights for {len(still)} parameter(s) of {type(inner).__name__}, e.g. "
            f"{still[:4]}; load it with keep_base_weights=True (or through transformers) instead."
        )
    peft_model.to(target)
    tok = AutoTokenizer.from_pretrained(str(tokenizer or ref))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return peft_model, tok


def is_compressed_folder(ref: Optional[Union[str, os.PathLike]]) -> bool:
    """Whether ``ref`` is a folder written by :func:`nsn_peft.save_compressed` (``nsn-peft compress``)."""
    from .export.compressed import is_export_folder

    return is_export_folder(ref)


def load_compressed_model(
    ref: Union[str, os.PathLike],
    *,
    tokenizer: Optional[Union[str, os.PathLike]] = None,
    dtype: Optional[Union[str, torch.dtype]] = None,
    device: Optional[Union[str, torch.device]] = None,
    device_map: Optional[DeviceMap] = None,
    max_memory: Optional[dict] = None,
    offload_folder: Optional[str] = None,
):
    """``(model, tokenizer)`` of a compressed export (fixed ranks, plain layers, no PEFT), placed as in :func:`load_model`."""
    from transformers import AutoTokenizer

    from .export.compressed import HUB_FILES, load_compressed

    ref = local_or_hub_folder(ref, list(HUB_FILES), what="compressed model")
    if tokenizer is None and not any((Path(ref) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise NoTokenizerError(f"{ref} holds no tokenizer; pass one (tokenizer=... / --tokenizer)")
    placed = placement_kwargs(device_map, max_memory, offload_folder)
    model = load_compressed(ref, device=None if placed else device, dtype=resolve_dtype(dtype), **placed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer or ref))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, tok
