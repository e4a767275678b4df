"""Loading a saved NSN adapter: what PEFT's own hooks let NSN do, and NSN's own entry point.

PEFT reads an adapter's config through the config class of its method (``NSNConfig.from_pretrained``, which
``PeftModel.from_pretrained``/``load_adapter`` and ``AutoPeftModel*`` all call), so everything NSN-specific about
loading hangs off that hook: completing a save that a kill interrupted after its commit point, checking the
fields the adapter's shapes depend on, the ``keep_base_weights`` override, and marking the config as "from a
checkpoint" so injection does not decompose weights the checkpoint is about to overwrite.

:func:`from_pretrained` is NSN's own entry point: ``PeftModel.from_pretrained`` with NSN's weight reader (plain
reads, ``nsn_B`` rank-major, no file mapping kept resident), which serving from factors only needs to stay
within one tensor of its final memory.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import AdapterLoadError
from ..io import check_safetensors, finish_interrupted_save

__all__ = [
    "STRUCTURAL_FIELDS",
    "check_config_fields",
    "check_weights_present",
    "finish_interrupted_adapter_save",
    "from_pretrained",
    "has_nsn_factors",
    "nsn_weight_reader",
    "nsn_weight_reader_active",
]

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
CONFIG_FILE = "adapter_config.json"

# The fields that decide which modules an adapter has and their shapes: a config without them would target
# other modules, or other ranks, than its checkpoint holds.
STRUCTURAL_FIELDS = (
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "max_rank",
    "rank_pattern",
)


def check_config_fields(config: dict, path: object) -> None:
    """Raise :class:`AdapterLoadError` naming ``path`` and the fields if an NSN config lacks structural fields."""
    missing = [name for name in STRUCTURAL_FIELDS if name not in config]
    if missing:
        raise AdapterLoadError(
            f"{os.fspath(path)} lacks the NSN field(s) {', '.join(missing)}: without them the adapter's modules and ranks "
            "cannot be recreated; restore them (save_pretrained writes every field)"
        )


def finish_interrupted_adapter_save(model_id: object, subfolder: object = None) -> None:
    """Complete a killed save of the local adapter folder ``model_id`` (or of the folder holding it)."""
    if not isinstance(model_id, (str, os.PathLike)) or not os.path.isdir(model_id):
        return  # a Hub id: nothing local to complete
    folder = Path(model_id)
    candidates = [folder, folder.parent]  # non-default adapters live in a subfolder of the saved folder
    if isinstance(subfolder, str) and subfolder:
        candidates.insert(0, folder / subfolder)
    for candidate in candidates:
        finish_interrupted_save(candidate)
    weights = candidates[0] / WEIGHT_FILES[0]
    if weights.is_file():
        check_safetensors(weights)  # a truncated or corrupt file is named, not reported from deep inside safetensors


def adapter_folder(model_id: object, subfolder: object = None) -> Optional[Path]:
    """The local folder an adapter is read from, or ``None`` for a Hub id."""
    if not isinstance(model_id, (str, os.PathLike)):
        return None
    folder = Path(model_id) / subfolder if isinstance(subfolder, str) and subfolder else Path(model_id)
    return folder if folder.is_dir() else None


def check_weights_present(folder: Path) -> None:
    """Raise ``FileNotFoundError`` naming the missing weights file of a local adapter folder.

    Without it PEFT falls back to the Hub and fails with "Repo id must be a string" for a ``pathlib.Path``.
    """
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(
            f"{folder / WEIGHT_FILES[0]} not found: the adapter folder {folder} holds {CONFIG_FILE} but no weights "
            "(an incomplete copy? save_pretrained writes both)"
        )


def has_nsn_factors(keys: Any) -> bool:
    """Whether state-dict keys hold NSN factors (``….nsn_A.<adapter>`` / ``….nsn_B.<adapter>``)."""
    return any(".nsn_A" in key or ".nsn_B" in key for key in keys)


def read_config_json(path: Union[str, os.PathLike]) -> dict:
    """An ``adapter_config.json`` as a dict; errors name the file and what to do."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except json.JSONDecodeError as err:
        raise AdapterLoadError(
            f"{os.fspath(path)} is not valid JSON ({err}); restore it from the original save (save_pretrained writes it)"
        ) from err
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{os.fspath(path)} holds a {type(data).__name__}, not an adapter config object")
    return data


# -- NSN's weight reader -------------------------------------------------------------------------------------
# True inside NSN's own loading entry points: PEFT's weight reader then reads NSN factor files with
# :func:`nsn_peft.io.read_safetensors` (see registration.py for why this one piece needs a patch).
_NSN_READER: contextvars.ContextVar[bool] = contextvars.ContextVar("nsn_weight_reader", default=False)


def nsn_weight_reader_active() -> bool:
    return _NSN_READER.get()


@contextlib.contextmanager
def nsn_weight_reader() -> Iterator[None]:
    """Within this scope, adapter weight files holding NSN factors are read with NSN's reader."""
    token = _NSN_READER.set(True)
    try:
        yield
    finally:
        _NSN_READER.reset(token)


def from_pretrained(
    model: Any,
    model_id: Union[str, os.PathLike],
    adapter_name: str = "default",
    *,
    keep_base_weights: Optional[bool] = None,
    is_trainable: bool = False,
    **kwargs: Any,
):
    """``PeftModel.from_pretrained`` for NSN adapters, with NSN's loading options.

    ``keep_base_weights`` overrides the adapter's saved setting (``False``: serve from the factors only, each
    dense weight freed as its factors arrive). The factors are read without a file mapping and ``nsn_B``
    arrives rank-major, so factors-only serving holds each factor once. Other keywords go to
    ``PeftModel.from_pretrained``.
    """
    from peft import PeftModel
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    config = kwargs.pop("config", None)
    if config is None:
        hub_keys = ("subfolder", "revision", "cache_dir", "token")
        config = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.NSN].from_pretrained(
            model_id, **{k: kwargs[k] for k in hub_keys if k in kwargs}
        )
    if getattr(config, "peft_type", None) != PeftType.NSN:
        raise AdapterLoadError(f"{model_id} holds a {getattr(config, 'peft_type', None)!r} adapter, not an NSN adapter")
    if keep_base_weights is not None:
        config.keep_base_weights = _check_bool(keep_base_weights)
    with nsn_weight_reader():
        return PeftModel.from_pretrained(
            model, model_id, adapter_name, is_trainable=is_trainable, config=config, **kwargs
        )


def _check_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"keep_base_weights must be a bool, got {value!r}")
    return value
