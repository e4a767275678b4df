"""benchmarks/bench_scale.py at a tiny width on the CPU: the smoke test, and peak memory flat in depth (slow)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scale.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_and_reports_per_block_figures(tmp_path, monkeypatch):
    out = tmp_path / "scale.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "bench_scale.py",
            "--device",
            "cpu",
            "--variants",
            "tiny:1,tiny:2",
            "--tokens",
            "256",
            "--seq-len",
            "32",
            "--isolate",
            "no",
            "--out",
            str(out),
        ],
    )
    _bench().main()
    rows = json.loads(out.read_text())["rows"]
    assert [r["blocks"] for r in rows] == [1, 2]
    for row in rows:
        assert row["report"]["achieved"] <= 0.6 and row["report"]["blockwise_steps"] > 0
        assert len(row["report"]["block_seconds"]["refine"]) == row["blocks"]
        assert set(row["seconds_per_block"]) >= {"statistics", "gradients", "spectra", "refine", "init"}


@pytest.mark.slow
def test_peak_memory_is_flat_in_depth(tmp_path):
    """64 blocks hold no more memory than 4: one block, its statistics and the hidden states at a time (the rest,
    statistics and factors included, on disk). A fixed mmap threshold keeps glibc's heap from fragmenting, which
    would otherwise let the peak RSS creep up by a few MiB per block with no more tensors alive."""
    out = tmp_path / "scale.json"
    bench = _bench()
    argv = [
        "bench_scale.py",
        "--device",
        "cpu",
        "--variants",
        "small:4,small:16,small:64",
        "--tokens",
        "2048",
        "--seq-len",
        "128",
        "--threads",
        "1",
        "--mmap-threshold",
        "65536",
        "--isolate",
        "yes",
        "--offload-folder",
        str(tmp_path / "work"),
        "--out",
        str(out),
        "--time-limit",
        "100000",
    ]
    sys_argv, sys.argv = sys.argv, argv
    try:
        bench.main()
    finally:
        sys.argv = sys_argv
    rows = {r["blocks"]: r for r in json.loads(out.read_text())["rows"]}
    growth = rows[64]["peak_rss_bytes"] - rows[4]["peak_rss_bytes"]
    model_growth = rows[64]["model_bytes"] - rows[4]["model_bytes"]
    assert growth < 0.25 * model_growth, (growth, model_growth)
