"""The PEFT boundary: importing nsn-peft leaves other PEFT methods as they were; NSN loading errors name what to do."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama

import nsn_peft
from nsn_peft import NSNConfig
from nsn_peft.errors import AdapterLoadError, TokenIdError
from nsn_peft.hub import read_adapter_config

TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"

# Save, reload and run a LoRA adapter (config read through PeftConfig and AutoPeftModel as well), with or without
# nsn_peft imported first. Everything observable goes to the output folder.
_LORA_SCRIPT = r"""
import json, sys
from pathlib import Path
if sys.argv[2] == "with":
    import nsn_peft  # noqa: F401
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from tiny_models import tiny_llama

out = Path(sys.argv[1])
model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
model.eval()
ids = torch.arange(24).reshape(2, 12) % 101
model.save_pretrained(out / "adapter")
model.save_pretrained(out / "adapter", selected_adapters=["default"])  # a second save over the first
loaded = PeftModel.from_pretrained(tiny_llama(), out / "adapter")
loaded.load_adapter(str(out / "adapter"), adapter_name="second")
config = PeftConfig.from_pretrained(out / "adapter")
with torch.no_grad():
    save_file({"saved": model(ids).logits, "loaded": loaded(ids).logits,
               "merged": loaded.merge_and_unload()(ids).logits}, out / "outputs.safetensors")
(out / "config.json").write_text(json.dumps({"config": config.to_dict(), "loaded": loaded.peft_config["second"].to_dict()},
                                            default=str, sort_keys=True))
"""


def _run_lora(tmp_path: Path, mode: str) -> Path:
    out = tmp_path / mode
    out.mkdir()
    # One hash seed for both runs: PEFT saves target_modules from a set, whose order follows string hashes.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]), "PYTHONHASHSEED": "0"}
    subprocess.run(
        [sys.executable, "-c", _LORA_SCRIPT, str(out), mode], check=True, env=env, capture_output=True, text=True
    )
    return out


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_importing_nsn_peft_leaves_a_lora_adapter_untouched(tmp_path):
    without, with_nsn = _run_lora(tmp_path, "without"), _run_lora(tmp_path, "with")
    assert _digests(with_nsn / "adapter") == _digests(without / "adapter")  # files, byte for byte
    assert json.loads((with_nsn / "config.json").read_text()) == json.loads((without / "config.json").read_text())
    a, b = load_file(with_nsn / "outputs.safetensors"), load_file(without / "outputs.safetensors")
    assert set(a) == {"saved", "loaded", "merged"}
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_peft_loading_entry_points_are_peft_own():
    """What PEFT offers hooks for is not patched: loading goes through NSNConfig and NSN's own entry points."""
    from peft.config import PeftConfigMixin

    for function in (PeftModel.from_pretrained, PeftModel.load_adapter):
        assert function.__module__ == "peft.peft_model" and not hasattr(function, "_nsn_patched")
    assert NSNConfig.from_pretrained.__func__.__module__ == "nsn_peft.tuner.config"
    assert PeftConfigMixin.from_pretrained.__func__.__module__ == "peft.config"


def _saved_nsn(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    model = get_peft_model(tiny_llama(), NSNConfig(max_rank=8)).eval()
    model.save_pretrained(tmp_path / "nsn")
    with torch.no_grad():
        logits = model(torch.arange(12).reshape(1, 12)).logits
    return tmp_path / "nsn", logits


def test_nsn_loading_options_go_through_nsn_entry_points(tmp_path):
    folder, expected = _saved_nsn(tmp_path)
    served = nsn_peft.from_pretrained(tiny_llama(), folder, keep_base_weights=False)
    layers = [m for m in served.modules() if isinstance(m, nsn_peft.NSNLinear)]
    assert layers and all(m.base_weight_dropped and m.nsn_B["default"].t().is_contiguous() for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(served(torch.arange(12).reshape(1, 12)).logits, expected, atol=0, rtol=0)
    again = PeftModel.from_pretrained(tiny_llama(), folder)  # the override did not stick to the saved config
    assert not any(m.base_weight_dropped for m in again.modules() if isinstance(m, nsn_peft.NSNLinear))


def test_a_loaded_config_adapts_another_model_afresh(tmp_path):
    folder, _ = _saved_nsn(tmp_path)
    config = NSNConfig.from_pretrained(folder)
    PeftModel.from_pretrained(tiny_llama(), folder, config=config)
    fresh = get_peft_model(tiny_llama(seed=3), config)  # the checkpoint mark was consumed: factors computed
    assert all(m.nsn_A["default"].abs().sum() > 0 for m in fresh.modules() if isinstance(m, nsn_peft.NSNLinear))


# -- loading errors that name what to do -------------------------------------------------------------------------
def test_nsn_factors_under_another_peft_type_raise(tmp_path):
    folder, _ = _saved_nsn(tmp_path)
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": config["task_type"],
                "r": 8,
                "target_modules": ["q_proj"],
                "base_model_name_or_path": None,
            }
        )
    )
    with pytest.raises(AdapterLoadError, match=r"adapter_model\.safetensors holds NSN factors .* peft_type='LORA'"):
        PeftModel.from_pretrained(tiny_llama(), folder)


def test_an_adapter_config_that_is_not_json_is_named(tmp_path):
    folder, _ = _saved_nsn(tmp_path)
    (folder / "adapter_config.json").write_text('{"peft_type": "NSN", ')
    with pytest.raises(AdapterLoadError, match=r"adapter_config\.json .*not valid JSON"):
        PeftModel.from_pretrained(tiny_llama(), folder)
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        read_adapter_config(folder)


def test_a_lora_config_that_is_not_json_keeps_peft_error(tmp_path):
    from peft import LoraConfig, PeftConfig

    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{")
    with pytest.raises(json.JSONDecodeError) as caught:
        PeftConfig.from_pretrained(tmp_path)
    assert not isinstance(caught.value, AdapterLoadError)


@pytest.mark.parametrize("as_path", [True, False])
def test_a_folder_without_weights_names_the_missing_file(tmp_path, as_path):
    folder, _ = _saved_nsn(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"adapter_model\.safetensors not found.*holds adapter_config\.json but no weights"
    ):
        PeftModel.from_pretrained(tiny_llama(), folder if as_path else str(folder))


def test_nsn_checkpoint_weights_still_load_through_peft_reader(tmp_path):
    """A plain PEFT load (PEFT's reader) of an NSN adapter gives the same outputs as NSN's entry point."""
    folder, expected = _saved_nsn(tmp_path)
    state = load_file(folder / "adapter_model.safetensors")
    save_file(state, folder / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(tiny_llama(), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.arange(12).reshape(1, 12)).logits, expected, atol=0, rtol=0)


def test_token_ids_outside_the_vocabulary_are_named():
    model = get_peft_model(tiny_llama(), NSNConfig(max_rank=8))
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.tensor([[1, 2, vocab + 5, 3]])
    with pytest.raises(TokenIdError, match=rf"token id {vocab + 5}, outside the model's vocabulary of {vocab} ids"):
        nsn_peft.evaluate_perplexity(model, ids, seq_len=4)
    with pytest.raises(TokenIdError, match="token id -1"):
        nsn_peft.perplexity(model, torch.tensor([1, -1, 2]), seq_len=3)
