"""The documentation builds (``mkdocs build --strict``: broken links, nav entries and docstring errors fail) and
the command-line reference covers every command and option."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nsn_peft.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    if shutil.which("mkdocs") is None and subprocess.run([sys.executable, "-m", "mkdocs", "--version"]).returncode != 0:
        pytest.skip("mkdocs is not installed (pip install -e '.[dev]')")
    site = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("NSNConfig", "set_rank", "select_rank_for_target_flops", "ActivationStats", "NSNTrainer"):
        assert name in api, f"{name} missing from the API reference"
    for page in ("concepts", "quickstart", "cli", "benchmarks", "training", "utilized_rank"):
        assert (site / page / "index.html").is_file(), page


def test_cli_reference_lists_every_command_and_option():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    _, commands = build_parser()
    missing = []
    for name, parser in commands.items():
        if f"### {name}" not in text:
            missing.append(f"section '### {name}'")
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or getattr(action, "training_arguments_field", False):
                continue  # train's pass-through of every TrainingArguments field is documented as one group
            for option in action.option_strings:
                if option.startswith("--") and f"`{option}`" not in text:
                    missing.append(f"{name} {option}")
    assert not missing, f"docs/cli.md lacks: {missing}"
