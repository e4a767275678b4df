"""Loading with accelerate's placement (``device_map``): base models, adapters (factors-only too) and compressed
exports give the outputs of a plain load, on the CPU, with ``"auto"``, and with part of the model on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tiny_models import build_tiny_model

import nsn_peft
from nsn_peft.devices import offloaded_to_disk
from nsn_peft.export.compressed import save_compressed
from nsn_peft.hub import load_adapter, load_compressed_model, load_model

IDS = torch.tensor([[5, 9, 11, 4, 7, 13, 8, 6]])
# Less CPU memory than the model takes: accelerate puts the rest on disk (the tiny model is ~0.2 MB).
SPILL = {"cpu": 20_000}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("device-map")
    build_tiny_model(root / "model")
    adapted = get_peft_model(load_model(root / "model"), nsn_peft.NSNConfig(target_modules="all-linear", max_rank=16))
    adapted.save_pretrained(root / "adapter")
    adapted.base_model.set_rank(8)
    save_compressed(adapted, root / "export")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (root / "model" / name).is_file():
            (root / "export" / name).write_bytes((root / "model" / name).read_bytes())
    return {"root": root, "model": root / "model", "adapter": root / "adapter", "export": root / "export"}


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_base_model_and_adapters_load_with_a_device_map(folders, device_map):
    expected = _logits(load_model(folders["model"]))
    torch.testing.assert_close(_logits(load_model(folders["model"], device_map=device_map)), expected)
    reference = _logits(load_adapter(folders["adapter"], model=str(folders["model"]))[0])
    for keep in (True, False):  # False: factors only, the dense weights of adapted layers never read
        model, _, _ = load_adapter(
            folders["adapter"], model=str(folders["model"]), device_map=device_map, keep_base_weights=keep
        )
        torch.testing.assert_close(_logits(model), reference)


def test_base_model_and_export_spill_to_disk(folders, tmp_path):
    expected = _logits(load_model(folders["model"]))
    spilled = load_model(folders["model"], device_map="auto", max_memory=SPILL, offload_folder=tmp_path / "base")
    assert offloaded_to_disk(spilled)
    torch.testing.assert_close(_logits(spilled), expected)
    exported = _logits(load_compressed_model(folders["export"])[0])
    export, _ = load_compressed_model(
        folders["export"], device_map="auto", max_memory=SPILL, offload_folder=tmp_path / "export"
    )
    assert offloaded_to_disk(export)
    torch.testing.assert_close(_logits(export), exported)


def test_adapters_refuse_a_placement_on_disk(folders, tmp_path):
    with pytest.raises(ValueError, match="on disk.*max_memory"):
        load_adapter(folders["adapter"], model=str(folders["model"]), device_map={"": "disk"})
    with pytest.raises(ValueError, match="max_memory and offload_folder apply to a device_map"):
        load_model(folders["model"], max_memory=SPILL)
