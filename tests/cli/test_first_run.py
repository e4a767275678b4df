"""What a first run meets: the embedded default model, a dense baseline beside every rank, data-aware factors
by default, ε written unambiguously, training on a CPU, and inputs that are not what they seem (a compressed
export given as a model, a checkpoint without a tokenizer or with missing weights).

Commands run in this process (``nsn_peft.cli.main``) on tiny random models, to stay fast.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny_model
from tiny_models import sentences as _sentences

from nsn_peft import gguf_models
from nsn_peft.cli import main


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """``cli(*argv, expect=0)`` runs a command in ``tmp_path``; returns (stdout, stderr). Global state is restored."""
    from nsn_peft.cli.runtime import set_progress

    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)

    def run(*argv: object, expect: int = 0) -> tuple[str, str]:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert code == expect, f"exit {code} (expected {expect})\nstdout:\n{out}\nstderr:\n{err}"
        return out, err

    with warnings.catch_warnings():
        yield run
    root.setLevel(level)
    root.handlers[:] = handlers
    set_progress(True)


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Path:
    """A tiny model, text, and a stand-in for the embedded default model in a private cache."""
    build_tiny_model(tmp_path / "tiny")
    (tmp_path / "train.txt").write_text("\n".join(_sentences(200, 1)) + "\n", encoding="utf-8")
    (tmp_path / "valid.txt").write_text("\n".join(_sentences(40, 2)) + "\n", encoding="utf-8")
    monkeypatch.setenv("NSN_PEFT_CACHE", str(tmp_path / "cache"))
    embedded = tmp_path / "cache" / gguf_models.EMBEDDED_NAME
    build_tiny_model(embedded, seed=1)
    (embedded / gguf_models.EMBEDDED_MARKER).write_text("{}", encoding="utf-8")
    return tmp_path


SMALL = ["--seq-len", "16", "--max-tokens", "256"]


def test_adapter_of_the_default_model_reopens_without_model(ws, cli):
    out, _ = cli("adapt", "--max-rank", "16", "--granularity", "8", "--output", "adapter", "--json")
    recorded = json.loads((ws / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == json.loads(out)["base_model"] == str(ws / "cache" / gguf_models.EMBEDDED_NAME)
    out, _ = cli("eval", "--adapter", "adapter", "--data", "valid.txt", "--ranks", "8,full", *SMALL, "--json")
    data = json.loads(out)
    assert data["model"] == recorded and len(data["results"]) == 2
    out, _ = cli("fetch-model", "--json")  # already there: nothing to fetch
    assert json.loads(out)["model"] == recorded


def test_eval_and_sweep_show_the_dense_baseline_beside_every_rank_by_default(ws, cli):
    cli("adapt", "--model", "tiny", "--granularity", "16", "--output", "adapter")  # full rank: exact
    out, _ = cli("eval", "--adapter", "adapter", "--data", "valid.txt", "--ranks", "16,full", *SMALL, "--json")
    data = json.loads(out)
    assert data["baseline_perplexity"] > 1
    full = next(r for r in data["results"] if r["label"] == "full")
    assert full["vs_dense"] == pytest.approx(1.0, rel=1e-4)  # full rank reproduces the dense model
    text, _ = cli("eval", "--adapter", "adapter", "--data", "valid.txt", "--ranks", "16", *SMALL)
    assert "vs dense" in text and "\ndense " in text and "tokens scored" in text
    out, _ = cli(
        "eval", "--adapter", "adapter", "--data", "valid.txt", "--ranks", "16", *SMALL, "--no-baseline", "--json"
    )
    assert json.loads(out)["baseline_perplexity"] is None and json.loads(out)["results"][0]["vs_dense"] is None
    cli("sweep", "--adapter", "adapter", "--data", "valid.txt", "--ranks", "16,32", *SMALL, "--output-dir", "sweep")
    rows = (ws / "sweep" / "sweep.csv").read_text().splitlines()
    assert rows[-1].startswith("dense,baseline,") and "vs_dense" in rows[0]


def test_stats_make_data_aware_factors_the_default(ws, cli):
    cli("calibrate", "--model", "tiny", "--data", "train.txt", *SMALL, "--output", "stats")
    out, _ = cli("adapt", "--model", "tiny", "--stats", "stats", "--output", "whitened", "--json")
    assert json.loads(out)["init"] == "whitened"
    out, _ = cli("adapt", "--model", "tiny", "--output", "plain", "--json")
    assert json.loads(out)["init"] == "svd"


@pytest.mark.parametrize("given, expected", [("0.5%", 0.005), ("0.005", 0.005), ("2%", 0.02)])
def test_epsilon_is_a_percentage_or_a_fraction(ws, cli, given, expected):
    cli("calibrate", "--model", "tiny", "--data", "train.txt", *SMALL, "--output", "stats")
    out, err = cli(
        "search-ranks",
        "--model",
        "tiny",
        "--stats",
        "stats",
        "--data",
        "valid.txt",
        "--epsilon",
        given,
        "--max-steps",
        "1",
        *SMALL,
        "--output",
        "plan.json",
        "--json",
    )
    data = json.loads(out)
    assert data["epsilon"] == pytest.approx(expected) and data["target"]["epsilon"] == pytest.approx(expected)
    assert "dense perplexity" in err and "evaluations" in err  # the time estimate after the first evaluation


def test_a_bare_large_epsilon_is_called_out_and_bad_ones_are_usage_errors(ws, cli):
    cli("calibrate", "--model", "tiny", "--data", "train.txt", *SMALL, "--output", "stats")
    out, err = cli(
        "search-ranks",
        "--model",
        "tiny",
        "--stats",
        "stats",
        "--data",
        "valid.txt",
        "--epsilon",
        "0.1",
        "--max-steps",
        "1",
        *SMALL,
        "--output",
        "plan.json",
    )
    assert "allows a 10% perplexity increase (write 0.1% for 0.1 percent)" in err
    assert "ε = 10%" in out
    for bad in ("abc", "-1%", "0"):
        _, err = cli("search-ranks", "--stats", "stats", "--epsilon", bad, "--output", "p.json", expect=2)
        assert "--epsilon" in err


def test_train_runs_on_cpu_and_leaves_no_empty_checkpoint_folder(ws, cli):
    out, _ = cli(
        "train",
        "--model",
        "tiny",
        "--max-rank",
        "16",
        "--data",
        "train.txt",
        "--seq-len",
        "16",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--device",
        "auto",
        "--output",
        "trained",
        "--json",
    )
    assert json.loads(out)["steps"] == 2 and (ws / "trained" / "adapter_model.safetensors").is_file()
    assert not (ws / "trained-checkpoints").exists()
    before = {p.name for p in ws.iterdir()}
    _, err = cli(
        "train",
        "--model",
        "tiny",
        "--max-rank",
        "16",
        "--data",
        "train.txt",
        "--seq-len",
        "100000",
        "--max-steps",
        "2",
        "--save-steps",
        "1",
        "--output",
        "failed",
        expect=1,
    )
    assert "not one block of 100000" in err
    _, err = cli(
        "train",
        "--model",
        "tiny",
        "--max-rank",
        "16",
        "--data",
        "train.txt",
        "--seq-len",
        "16",
        "--max-steps",
        "2",
        "--save-steps",
        "1",
        "--lr-scheduler",
        "bogus",
        "--output",
        "failed",
        expect=1,
    )
    assert "bogus" in err
    assert {p.name for p in ws.iterdir()} == before  # neither the output nor an empty checkpoints folder
    _, err = cli(
        "train", "--model", "tiny", "--data", "train.txt", "--fp16", "--device", "cpu", "--output", "x", expect=2
    )
    assert "--fp16 mixed precision needs a GPU" in err


def test_compressed_export_is_refused_where_a_base_model_is_expected(ws, cli):
    cli("adapt", "--model", "tiny", "--max-rank", "16", "--output", "adapter")
    cli("compress", "--adapter", "adapter", "--rank", "8", "--output", "compressed")
    before = {p.name for p in ws.iterdir()}
    for command in (["train", "--data", "train.txt"], ["adapt"], ["calibrate", "--data", "train.txt"]):
        _, err = cli(*command, "--model", "compressed", "--output", "out", expect=2)
        assert "compressed export" in err and "--adapter" in err
    assert {p.name for p in ws.iterdir()} == before
    out, _ = cli("eval", "--model", "compressed", "--data", "valid.txt", *SMALL, "--json")  # eval runs it as it is
    assert json.loads(out)["baseline_perplexity"] is None


def test_adapt_needs_no_tokenizer_and_missing_weights_fail(ws, cli):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ws / "tiny").save_pretrained(ws / "checkpoint")  # weights, no tokenizer
    out, _ = cli("adapt", "--model", "checkpoint", "--max-rank", "16", "--output", "adapter", "--json")
    assert json.loads(out)["layers"] == 14
    _, err = cli("adapt", "--model", "checkpoint", "--save-tokenizer", "--output", "with-tok", expect=2)
    assert "holds no tokenizer; pass --tokenizer" in err
    cli("adapt", "--model", "checkpoint", "--tokenizer", "tiny", "--save-tokenizer", "--output", "with-tok")
    assert (ws / "with-tok" / "tokenizer_config.json").is_file()

    weights = ws / "checkpoint" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.0.self_attn.q_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    _, err = cli("adapt", "--model", "checkpoint", "--output", "broken", expect=1)
    assert "lacks 1 weight(s)" in err and "model.layers.0.self_attn.q_proj.weight" in err
    assert not (ws / "broken").exists()
