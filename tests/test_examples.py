"""Smoke tests of the scripts in ``examples/`` on a tiny random Llama (real subprocess runs, a few steps each)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import WORDS, build_tiny_model
from tiny_models import sentences as _sentences

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(script: str, *args: object, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, (
        f"{script} failed ({proc.returncode})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("examples")
    build_tiny_model(root / "tiny")
    (root / "train.txt").write_text("\n".join(_sentences(200, 1)) + "\n", encoding="utf-8")
    (root / "valid.txt").write_text("\n".join(_sentences(60, 2)) + "\n", encoding="utf-8")
    with open(root / "labels.jsonl", "w", encoding="utf-8") as f:
        for i, line in enumerate(_sentences(40, 4)):
            label = i % 2
            text = " ".join(WORDS[:8] if label else WORDS[8:16]) + " " + line
            f.write(json.dumps({"text": text, "label": ["first", "second"][label]}) + "\n")
    return root


def test_push_to_hub_dry_run_writes_the_upload_folder(ws):
    proc = run_example(
        "push_to_hub.py",
        "--repo-id",
        "someone/tiny-nsn",
        "--model",
        "tiny",
        "--max-rank",
        "32",
        "--granularity",
        "16",
        "--base-model-id",
        "someone/tiny",
        "--dry-run",
        "--output",
        "upload",
        cwd=ws,
    )
    assert "Dry run" in proc.stdout
    folder = ws / "upload"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "NSN" and config["base_model_name_or_path"] == "someone/tiny"
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "base_model: someone/tiny" in card
    assert "## NSN adapter" in card and 'PeftModel.from_pretrained(base, "someone/tiny-nsn")' in card


def test_sequence_classification_at_a_rank(ws):
    proc = run_example(
        "sequence_classification.py",
        "--model",
        "tiny",
        "--data",
        "labels.jsonl",
        "--max-rank",
        "32",
        "--granularity",
        "16",
        "--rank",
        "16",
        "--max-steps",
        "2",
        "--max-examples",
        "20",
        "--seq-len",
        "24",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--output",
        "cls.json",
        cwd=ws,
    )
    assert "rank    16: accuracy" in proc.stdout
    results = json.loads((ws / "cls.json").read_text())
    assert results["classes"] == ["first", "second"] and set(results["at_rank"]) == {"16", "32"}
    assert all(0 <= r["accuracy"] <= 1 for r in results["at_rank"].values())


def test_rank_sweep_writes_csv_and_plot(ws):
    run_example(
        "rank_sweep.py",
        "--model",
        "tiny",
        "--data",
        "valid.txt",
        "--max-rank",
        "32",
        "--granularity",
        "16",
        "--points",
        "2",
        "--seq-len",
        "16",
        "--max-tokens",
        "256",
        "--device",
        "cpu",
        "--output-dir",
        "sweep",
        cwd=ws,
    )
    with open(ws / "sweep" / "rank_sweep.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == [16, 32] and all(float(r["perplexity"]) > 1 for r in rows)
    assert (ws / "sweep" / "rank_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((ws / "sweep" / "rank_sweep.json").read_text())["dense_perplexity"] > 1


def test_utilized_rank_pipeline_end_to_end(ws):
    proc = run_example(
        "utilized_rank_pipeline.py",
        "--model",
        "tiny",
        "--calib-data",
        "train.txt",
        "--eval-data",
        "valid.txt",
        "--target-fraction",
        "0.6",
        "--granularity",
        "16",
        "--seq-len",
        "16",
        "--calib-tokens",
        "512",
        "--eval-tokens",
        "256",
        "--device",
        "cpu",
        "--output-dir",
        "utilized",
        cwd=ws,
    )
    summary = json.loads((ws / "utilized" / "summary.json").read_text())
    assert summary["dense_perplexity"] > 1 and summary["compressed_perplexity"] > 1
    assert summary["reloaded_perplexity"] == pytest.approx(summary["compressed_perplexity"], rel=1e-4)
    assert "perplexity" in proc.stdout


def test_train_multirank_example_trains_the_served_ranks(ws):
    proc = run_example(
        "train_multirank.py",
        "--model",
        "tiny",
        "--train-data",
        "train.txt",
        "--eval-data",
        "valid.txt",
        "--max-steps",
        "2",
        "--block-size",
        "16",
        "--batch-size",
        "2",
        "--eval-tokens",
        "256",
        "--calib-tokens",
        "128",
        "--device",
        "cpu",
        "--output-dir",
        "multirank",
        cwd=ws,
    )
    assert "| rank | % of max |" in proc.stdout and "adapter saved to" in proc.stdout
    final = ws / "multirank" / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "nsn_multirank_state.json").is_file()
    state = json.loads((final / "nsn_multirank_state.json").read_text())
    assert state["sampler"]["config"]["ranks"] == state["grid"]  # the default trains exactly the evaluated ranks
    assert state["distill_alpha"] == 0.5
