"""How PEFT learns about NSN: its registration API, and the few patches for what PEFT has no hook for.

This is the one module that changes PEFT. Importing nsn-peft leaves every other method's behaviour, files and
speed as they were: each patch below checks first whether an NSN adapter is involved and otherwise calls PEFT's
own function with the same arguments (``tests/tuner/test_peft_boundary.py`` saves and loads a LoRA adapter with
and without nsn-peft imported and compares files, configs and outputs). docs/architecture.md, "The PEFT
boundary", lists the same pieces.

Through PEFT's hooks (no patch):

- ``register_peft_method`` registers ``NSNConfig``/``NSNModel`` under the ``"nsn"`` prefix;
- ``NSNConfig.from_pretrained``/``from_json_file`` (PEFT reads every saved config through the config class of
  its method): completing interrupted saves, checking structural fields, ``keep_base_weights=``, and marking the
  config "from a checkpoint" so injection skips the initialisation the checkpoint overwrites;
- ``NSNModel._get_adapter_state_dict``/``_remap_adapter_state_dict_for_load``: derived config fields at save
  time, shape/finiteness checks at load time;
- NSN-only loading options: :func:`nsn_peft.tuner.loading.from_pretrained` and :func:`nsn_peft.hub.load_adapter`.

Patched (no hook exists), each a no-op unless NSN is involved:

1. ``PeftType.NSN``: ``register_peft_method`` accepts only names that are members of PEFT's closed enum
   (:func:`~nsn_peft.tuner.peft_type.extend_peft_type` adds one member; existing members are untouched).
2. ``PeftModel.save_pretrained``: NSN saves are transactional (:func:`nsn_peft.io.atomic_directory`); PEFT writes
   files one by one, so a kill could leave new weights beside an old config. Other adapters: PEFT's function.
3. ``PeftModel.create_or_update_model_card``: the NSN section (ranks, FLOPs) is appended after PEFT's card,
   for NSN adapters only.
4. ``peft.utils.save_and_load.safe_load_file``: inside NSN's own loading entry points, NSN factor files are
   read without a file mapping and ``nsn_B`` arrives rank-major (factors-only serving then holds each factor
   once; PEFT's mapped read kept +0.6x the factors' size resident on CPU). Outside them, PEFT's reader runs;
   if the file holds NSN factors but its ``adapter_config.json`` names another method, loading stops with an
   error (it would otherwise load into that method with wrong outputs and only a warning).
5. ``PeftConfigMixin.from_json_file``, on its error path only: an ``adapter_config.json`` that is not valid JSON
   beside NSN factors is reported naming the file (PEFT raises a bare ``JSONDecodeError``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

from peft import PeftModel
from peft.config import PeftConfigMixin
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from ..errors import AdapterLoadError
from ..io import atomic_directory, check_safetensors, read_safetensors
from .config import NSNConfig
from .loading import (  # noqa: F401  (check_config_fields, finish_interrupted_adapter_save: imported from here too)
    CONFIG_FILE,
    WEIGHT_FILES,
    check_config_fields,
    finish_interrupted_adapter_save,
    has_nsn_factors,
    nsn_weight_reader_active,
)
from .model import NSNModel
from .model_card import append_nsn_section
from .peft_type import extend_peft_type

_PATCHED = "_nsn_patched"


def _saves_nsn(model: PeftModel, selected_adapters) -> bool:
    names = selected_adapters if selected_adapters is not None else list(model.peft_config)
    return any(getattr(model.peft_config.get(n), "peft_type", None) == PeftType.NSN for n in names)


def _patch_save_pretrained() -> None:
    """(2) ``PeftModel.save_pretrained``: transactional for NSN adapters (all their files, one commit)."""
    original = PeftModel.save_pretrained
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def save_pretrained(self, save_directory, safe_serialization=True, selected_adapters=None, *args, **kwargs):
        if not kwargs.get("is_main_process", True) or not _saves_nsn(self, selected_adapters):
            return original(self, save_directory, safe_serialization, selected_adapters, *args, **kwargs)
        if os.path.isfile(save_directory):  # PEFT's own check, kept first
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        with atomic_directory(save_directory) as staging:
            card = Path(save_directory) / "README.md"
            if card.is_file():  # PEFT updates an existing model card rather than replacing it
                shutil.copyfile(card, staging / "README.md")
            return original(self, str(staging), safe_serialization, selected_adapters, *args, **kwargs)

    setattr(save_pretrained, _PATCHED, True)
    PeftModel.save_pretrained = save_pretrained


def _patch_model_card() -> None:
    """(3) The NSN section (ranks, FLOPs) appended to the README that ``save_pretrained`` writes."""
    original = PeftModel.create_or_update_model_card
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str):
        result = original(self, output_dir)
        config = self.peft_config.get(self.active_adapter) if isinstance(self.active_adapter, str) else None
        if config is not None and config.peft_type == PeftType.NSN:
            append_nsn_section(self, output_dir)
        return result

    setattr(create_or_update_model_card, _PATCHED, True)
    PeftModel.create_or_update_model_card = create_or_update_model_card


def _check_config_is_nsn(weights: str) -> None:
    """Raise if the ``adapter_config.json`` beside a file of NSN factors names another method."""
    path = Path(weights).parent / CONFIG_FILE
    try:
        peft_type = json.loads(path.read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return  # no readable config beside the weights (a Hub download elsewhere): PEFT's checks apply
    if peft_type != PeftType.NSN.value:
        raise AdapterLoadError(
            f"{weights} holds NSN factors (nsn_A/nsn_B) but {path} says peft_type={peft_type!r}: the factors would "
            f'be ignored and the model would run without them. Set "peft_type": "NSN" in {path} (and import '
            "nsn_peft), or load the adapter it was saved with."
        )


def _patch_weight_reader() -> None:
    """(4) NSN's reader inside NSN's entry points; a factors-vs-config check for files holding NSN factors."""
    from peft.utils import save_and_load

    original = save_and_load.safe_load_file
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def safe_load_file(filename, device="cpu"):
        if nsn_weight_reader_active() and has_nsn_factors(check_safetensors(filename)):
            return read_safetensors(filename, device=device, column_major=lambda key: key.endswith(".nsn_B"))
        weights = original(filename, device=device)
        if has_nsn_factors(weights):
            _check_config_is_nsn(filename)
        return weights

    setattr(safe_load_file, _PATCHED, True)
    save_and_load.safe_load_file = safe_load_file


def _holds_nsn_factors(folder: Path) -> bool:
    weights = folder / WEIGHT_FILES[0]
    try:
        return weights.is_file() and has_nsn_factors(check_safetensors(weights))
    except (OSError, ValueError):
        return False


def _patch_config_reader() -> None:
    """(5) On the error path only: invalid JSON beside NSN factors is reported naming the file."""
    original = PeftConfigMixin.from_json_file.__func__
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def from_json_file(cls, path_json_file, **kwargs):
        try:
            return original(cls, path_json_file, **kwargs)
        except json.JSONDecodeError as err:
            if not _holds_nsn_factors(Path(os.fspath(path_json_file)).parent):
                raise
            raise AdapterLoadError(
                f"{os.fspath(path_json_file)} (the config of an NSN adapter) is not valid JSON ({err}); restore it "
                "from the original save (save_pretrained writes it)"
            ) from err

    setattr(from_json_file, _PATCHED, True)
    PeftConfigMixin.from_json_file = classmethod(from_json_file)


def register() -> None:
    """Register the ``"nsn"`` method with PEFT and install the NSN-scoped patches (idempotent)."""
    peft_type = extend_peft_type()  # (1)
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name="nsn", config_cls=NSNConfig, model_cls=NSNModel, prefix="nsn_")
    _patch_save_pretrained()
    _patch_model_card()
    _patch_weight_reader()
    _patch_config_reader()
