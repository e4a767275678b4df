"""Registration with PEFT: the ``"nsn"`` method, and the PEFT entry points NSN wraps.

Loading a saved adapter must not spend time decomposing weights that the checkpoint overwrites, so
``PeftModel.from_pretrained``/``load_adapter`` run inside a "loading a checkpoint" scope; ``save_pretrained``'s
model card gains the NSN section (ranks, FLOPs). Saving an NSN adapter is transactional
(:func:`nsn_peft.io.atomic_directory`): PEFT writes the new version into a staging folder whose files then
replace their namesakes together, and every PEFT load of a local folder first completes a save that a kill
interrupted after its commit point, so no reader ever sees new weights beside an old config.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

from peft import PeftModel
from peft.config import PeftConfigMixin
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from ..io import atomic_directory, check_safetensors, finish_interrupted_save, read_safetensors
from .config import NSNConfig
from .layer import NSNLayer
from .model import NSNModel
from .model_card import append_nsn_section
from .peft_type import checkpoint_load_scope, extend_peft_type, keep_base_weights_scope


def _make_rank_major(model) -> None:
    """After loading for serving (factors only; the checkpoint's tensors are released by now), store ``nsn_B``
    rank-major, layer by layer."""
    for module in model.modules():
        if isinstance(module, NSNLayer) and module.base_weight_dropped:
            module.make_rank_major()


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
    weights = candidates[0] / "adapter_model.safetensors"
    if weights.is_file():
        check_safetensors(weights)  # a truncated or corrupt file is named, not reported from deep inside safetensors


def _patch_loading_entry_points() -> None:
    """Mark PEFT's adapter-loading entry points so NSN injection skips the decomposition there, and complete
    interrupted saves before PEFT reads a local folder."""
    if getattr(PeftModel, "_nsn_patched", False):
        return
    original_from_pretrained = PeftModel.from_pretrained.__func__
    original_load_adapter = PeftModel.load_adapter
    original_from_json_file = PeftConfigMixin.from_json_file.__func__

    # ``keep_base_weights=`` (NSN only) overrides the saved config: False loads for serving from factors only.
    @functools.wraps(original_from_pretrained)
    def from_pretrained(cls, model, model_id, *args, keep_base_weights=None, **kwargs):
        finish_interrupted_adapter_save(model_id, kwargs.get("subfolder"))
        source = _source(model_id, kwargs.get("subfolder"))
        with checkpoint_load_scope(source), keep_base_weights_scope(keep_base_weights):
            loaded = original_from_pretrained(cls, model, model_id, *args, **kwargs)
        _make_rank_major(loaded)
        return loaded

    @functools.wraps(original_load_adapter)
    def load_adapter(self, model_id, *args, keep_base_weights=None, **kwargs):
        finish_interrupted_adapter_save(model_id, kwargs.get("subfolder"))
        source = _source(model_id, kwargs.get("subfolder"))
        with checkpoint_load_scope(source), keep_base_weights_scope(keep_base_weights):
            result = original_load_adapter(self, model_id, *args, **kwargs)
        _make_rank_major(self)
        return result

    @functools.wraps(original_from_json_file)
    def from_json_file(cls, path_json_file, **kwargs):
        # Every config read (PeftConfig.from_pretrained, AutoPeftModel…) goes through here.
        finish_interrupted_adapter_save(os.path.dirname(os.fspath(path_json_file)) or ".")
        loaded = original_from_json_file(cls, path_json_file, **kwargs)
        if isinstance(loaded, dict) and loaded.get("peft_type") == PeftType.NSN.value:
            check_config_fields(loaded, path_json_file)
        return loaded

    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter
    PeftConfigMixin.from_json_file = classmethod(from_json_file)
    PeftModel._nsn_patched = True


def _patch_weight_reader() -> None:
    """Read NSN adapter weights with plain reads (:func:`nsn_peft.io.read_safetensors`), not through a file mapping.

    PEFT's loader maps the file; factors loaded without a copy then keep the whole mapping resident, and
    ``nsn_B``'s rank-major copy leaves its mapped pages behind (measured: +0.6x the factors' size in RSS on
    CPU). ``nsn_B`` arrives rank-major (see :func:`~nsn_peft.tuner.layer.rank_major`), which factors-only
    serving keeps as is; other loads copy it into their own contiguous factors. Other adapters keep PEFT's
    reader.
    """
    from peft.utils import save_and_load

    original = save_and_load.safe_load_file
    if getattr(original, "_nsn_patched", False):
        return

    @functools.wraps(original)
    def safe_load_file(filename, device="cpu"):
        if any(".nsn_A" in key or ".nsn_B" in key for key in check_safetensors(filename)):
            return read_safetensors(filename, device=device, column_major=lambda key: key.endswith(".nsn_B"))
        return original(filename, device=device)

    safe_load_file._nsn_patched = True
    save_and_load.safe_load_file = safe_load_file


def _source(model_id: object, subfolder: object) -> str:
    """What load errors name: the local adapter folder (or the Hub id)."""
    source = os.fspath(model_id) if isinstance(model_id, (str, os.PathLike)) else repr(model_id)
    source = os.path.join(source, subfolder) if isinstance(subfolder, str) and subfolder else source
    weights = os.path.join(source, "adapter_model.safetensors")
    return weights if os.path.isfile(weights) else source


# The fields that decide which modules an adapter has and their shapes: a config without them would target
# other modules, or other ranks, than its checkpoint holds.
STRUCTURAL_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "max_rank", "rank_pattern")


def check_config_fields(config: dict, path: object) -> None:
    """Raise a ``ValueError`` naming ``path`` and the fields if an NSN ``adapter_config.json`` lacks structural fields."""
    missing = [name for name in STRUCTURAL_FIELDS if name not in config]
    if missing:
        raise ValueError(
            f"{os.fspath(path)} lacks the NSN field(s) {', '.join(missing)}: without them the adapter's modules and ranks "
            "cannot be recreated; restore them (save_pretrained writes every field)"
        )


def _saves_nsn(model: PeftModel, selected_adapters) -> bool:
    names = selected_adapters if selected_adapters is not None else list(model.peft_config)
    return any(getattr(model.peft_config.get(n), "peft_type", None) == PeftType.NSN for n in names)


def _patch_saving_entry_point() -> None:
    """Make ``PeftModel.save_pretrained`` transactional for NSN adapters (all its files, one commit)."""
    if getattr(PeftModel.save_pretrained, "_nsn_patched", False):
        return
    original = PeftModel.save_pretrained

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

    save_pretrained._nsn_patched = True
    PeftModel.save_pretrained = save_pretrained


def _patch_model_card() -> None:
    """Append the NSN section (ranks, FLOPs) to the README that ``save_pretrained`` writes."""
    if getattr(PeftModel.create_or_update_model_card, "_nsn_patched", False):
        return
    original = PeftModel.create_or_update_model_card

    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str):
        result = original(self, output_dir)
        config = self.peft_config.get(self.active_adapter) if isinstance(self.active_adapter, str) else None
        if config is not None and config.peft_type == PeftType.NSN:
            append_nsn_section(self, output_dir)
        return result

    create_or_update_model_card._nsn_patched = True
    PeftModel.create_or_update_model_card = create_or_update_model_card


def register() -> None:
    peft_type = extend_peft_type()
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name="nsn", config_cls=NSNConfig, model_cls=NSNModel, prefix="nsn_")
    _patch_loading_entry_points()
    _patch_saving_entry_point()
    _patch_weight_reader()
    _patch_model_card()
