"""The command line at scale: data-parallel ``calibrate`` (``--num-processes``, or launched by torchrun)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_model, sentences

import nsn_peft
from nsn_peft import ActivationStats
from nsn_peft.calibrate.stats import GRADIENT_STATS_SUBDIR


def run(
    *args: object, cwd: Path, launcher: tuple[str, ...] = ("-m", "nsn_peft"), expect: int = 0
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }
    env["PYTHONPATH"] = os.pathsep.join([str(Path(nsn_peft.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, *launcher, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-scale")
    build_tiny_model(root / "tiny")
    (root / "train.txt").write_text("\n".join(sentences(300, 1)) + "\n", encoding="utf-8")
    return root


CALIBRATE = (
    "calibrate",
    "--model",
    "tiny",
    "--data",
    "train.txt",
    "--seq-len",
    "16",
    "--max-tokens",
    "256",
    "--batch-size",
    "1",
    "--gradients",
    "--gradient-tokens",
    "128",
    "--json",
)


def _assert_same_statistics(folder: Path, reference: Path) -> None:
    for sub in ("", GRADIENT_STATS_SUBDIR):
        got, expected = ActivationStats.load(folder / sub), ActivationStats.load(reference / sub)
        assert got.token_counts == expected.token_counts
        for name, gram in expected.grams.items():
            # One sequence per batch: the float32 batch products are the same; the float32 files round the sums.
            torch.testing.assert_close(got.grams[name], gram, rtol=1e-6, atol=1e-6 * float(gram.abs().max()))


def test_calibrate_in_two_processes_saves_the_single_process_statistics(ws):
    run(*CALIBRATE, "--output", "single", cwd=ws)
    proc = run(*CALIBRATE, "--num-processes", "2", "--output", "parallel", cwd=ws)
    data = json.loads(proc.stdout)
    assert data["processes"] == 2 and data["tokens"] == 256 and data["gradient_tokens"] == 128
    _assert_same_statistics(ws / "parallel", ws / "single")


def test_calibrate_with_a_device_map_and_its_usage_errors(ws):
    if not (ws / "single").exists():
        run(*CALIBRATE, "--output", "single", cwd=ws)
    run(*CALIBRATE, "--device-map", "auto", "--max-memory", "cpu=2GiB", "--output", "placed", cwd=ws)
    _assert_same_statistics(ws / "placed", ws / "single")
    proc = run(*CALIBRATE, "--max-memory", "cpu=2GiB", "--output", "unplaced", cwd=ws, expect=2)
    assert "--max-memory and --offload-folder apply to --device-map" in proc.stderr
    proc = run(*CALIBRATE, "--device-map", "auto", "--max-memory", "cpu", "--output", "unplaced", cwd=ws, expect=2)
    assert "DEVICE=SIZE" in proc.stderr


@pytest.mark.slow
def test_calibrate_under_torchrun(ws):
    if not (ws / "single").exists():
        run(*CALIBRATE, "--output", "single", cwd=ws)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = run(
        *CALIBRATE,
        "--output",
        "launched",
        cwd=ws,
        launcher=("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port), "-m", "nsn_peft"),
    )
    assert json.loads(proc.stdout)["processes"] == 2  # the first process reports, the other prints nothing
    _assert_same_statistics(ws / "launched", ws / "single")


def test_train_takes_every_training_arguments_field_and_builds_its_set_with_datasets(ws):
    from nsn_peft.cli import build_parser

    parser, _ = build_parser()
    args = parser.parse_args(
        [
            "train",
            "--data",
            "train.txt",
            "--output",
            "o",
            "--report_to",
            "tensorboard",
            "--optim",
            "adafactor",
            "--adam-beta2",
            "0.9",
            "--push_to_hub",
            "--learning-rate",
            "3e-4",
        ]
    )
    from nsn_peft.cli.train import _training_overrides

    assert _training_overrides(args) == {
        "report_to": "tensorboard",
        "optim": "adafactor",
        "adam_beta2": 0.9,
        "push_to_hub": True,
    }
    assert args.learning_rate == 3e-4  # the command's own option keeps its name
    if not (ws / "adapter").exists():
        run("adapt", "--model", "tiny", "--max-rank", "16", "--output", "adapter", cwd=ws)
    proc = run(
        "train",
        "--adapter",
        "adapter",
        "--data",
        "train.txt",
        "--seq-len",
        "16",
        "--max-tokens",
        "256",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--optim",
        "sgd",
        "--max_grad_norm",
        "0.5",
        "--output",
        "trained",
        "--json",
        cwd=ws,
    )
    data = json.loads(proc.stdout)
    assert data["steps"] == 2 and data["train_blocks"] == 16  # 256 tokens in blocks of 16, grouped by datasets' map
    assert data["optimizer"] == "SGD" and data["training_arguments"]["max_grad_norm"] == 0.5
