"""Hub ids work wherever a folder does (load_adapter, load_compressed, the CLI's info/eval/infer), reading only the
files needed; tested offline against a local stand-in for the Hub."""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
import warnings

import huggingface_hub
import pytest
import torch
from peft import get_peft_model
from tiny_models import char_tokenizer, tiny_llama

from nsn_peft import NSNConfig, load_compressed, save_compressed
from nsn_peft.cli import main
from nsn_peft.hub import load_adapter


class FakeHub:
    """``snapshot_download``/``hf_hub_download`` served from local folders; records every file handed out."""

    def __init__(self, root):
        self.root, self.repos, self.fetched = root, {}, []

    def snapshot_download(self, repo_id, allow_patterns=None, **kwargs):
        source = self._repo(repo_id)
        dest = self.root / "cache" / repo_id.replace("/", "--")
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            rel = file.relative_to(source).as_posix()
            if allow_patterns is not None and not any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, dest / rel)
            self.fetched.append((repo_id, rel))
        return str(dest)

    def hf_hub_download(self, repo_id, filename, **kwargs):
        path = self._repo(repo_id) / filename
        if not path.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        self.fetched.append((repo_id, filename))
        return str(path)

    def _repo(self, repo_id):
        if repo_id not in self.repos:
            raise huggingface_hub.errors.RepositoryNotFoundError(f"404: {repo_id}")
        return self.repos[repo_id]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    return fake


@pytest.fixture
def in_process():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    with warnings.catch_warnings():
        yield main
    root.setLevel(level)
    root.handlers[:] = handlers


def _nsn_model():
    model = get_peft_model(tiny_llama(), NSNConfig(target_modules=["up_proj", "down_proj"], init="svd"))
    model.set_rank(4)
    return model


def test_load_compressed_and_load_adapter_take_hub_ids_and_read_only_what_they_need(tmp_path, hub, input_ids):
    model = _nsn_model()
    with torch.no_grad():
        expected = model(input_ids).logits
    export = save_compressed(model, tmp_path / "repo-export", tokenizer=char_tokenizer())
    (export / "training_log.bin").write_bytes(b"\0" * 1000)  # in the repository, not needed to run the model
    hub.repos["someone/tiny-export"] = export
    loaded = load_compressed("someone/tiny-export")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    assert ("someone/tiny-export", "model.safetensors") in hub.fetched
    assert ("someone/tiny-export", "training_log.bin") not in hub.fetched

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    model.save_pretrained(tmp_path / "repo-adapter")
    (tmp_path / "repo-adapter" / "optimizer.bin").write_bytes(b"\0" * 1000)
    hub.repos["someone/tiny-adapter"] = tmp_path / "repo-adapter"
    char_tokenizer().save_pretrained(base)
    peft_model, _, _ = load_adapter("someone/tiny-adapter", model=base)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    assert ("someone/tiny-adapter", "optimizer.bin") not in hub.fetched
    with pytest.raises(
        FileNotFoundError, match="'nobody/nothing' is not a local path, and the Hub repository could not be read"
    ):
        load_compressed("nobody/nothing")


def test_cli_info_eval_and_infer_take_hub_ids(tmp_path, hub, in_process, capsys, monkeypatch):
    model = _nsn_model()
    hub.repos["someone/tiny-export"] = save_compressed(model, tmp_path / "repo-export", tokenizer=char_tokenizer())
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    model.save_pretrained(tmp_path / "repo-adapter")
    hub.repos["someone/tiny-adapter"] = tmp_path / "repo-adapter"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "valid.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)

    assert in_process(["info", "--adapter", "someone/tiny-export", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "compressed" and info["num_layers"] == 4
    assert in_process(["info", "--adapter", "someone/tiny-adapter", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "adapter"
    assert (
        in_process(
            [
                "eval",
                "--model",
                "someone/tiny-export",
                "--data",
                "valid.txt",
                "--seq-len",
                "16",
                "--max-tokens",
                "128",
                "--json",
            ]
        )
        == 0
    )
    (row,) = json.loads(capsys.readouterr().out)["results"]
    assert row["perplexity"] > 1
    assert (
        in_process(
            [
                "infer",
                "--adapter",
                "someone/tiny-adapter",
                "--model",
                str(base),
                "--prompt",
                "ab",
                "--max-new-tokens",
                "3",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)
