"""End-to-end tests of the ``nsn-peft`` command line on a tiny random Llama saved to a temporary folder.

Most tests run the real command in a subprocess (``python -m nsn_peft ...``); each start imports torch and
transformers, so the expensive artefacts (the tiny model, an adapter, activation statistics) are built once
per module. Checks that fail before any model is loaded run in-process through ``nsn_peft.cli.main``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import build_tiny_model
from tiny_models import sentences as _sentences

import nsn_peft
from nsn_peft.cli import build_parser, main

COMMANDS = [
    "adapt",
    "calibrate",
    "search-ranks",
    "compress",
    "train",
    "eval",
    "sweep",
    "infer",
    "info",
    "fetch-model",
    "fetch-tasks",
]
GRANULARITY = "16"
MAX_RANK = "32"


def run_cli(*args: object, cwd: Path, expect: int = 0) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }
    # The subprocess runs in another folder: point it at the package under test, not at whatever a relative
    # PYTHONPATH or an installed copy would resolve to there.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(nsn_peft.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "nsn_peft", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == expect, (
        f"exit {proc.returncode} (expected {expect})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


def assert_one_line_error(stderr: str, command: str, fragment: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "no error message"
    assert lines[-1].startswith(f"nsn-peft {command}: error: "), lines[-1]
    assert fragment in lines[-1], lines[-1]
    assert "Traceback" not in stderr


def entries(folder: Path) -> set[str]:
    """Everything in ``folder``, hidden temporaries included (a failed command must leave none)."""
    return {p.name for p in folder.iterdir()}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Workspace: tiny model, a second model of another width, text data in three formats."""
    root = tmp_path_factory.mktemp("cli")
    build_tiny_model(root / "tiny")
    (root / "train.txt").write_text("\n".join(_sentences(300, 1)) + "\n", encoding="utf-8")
    (root / "valid.txt").write_text("\n".join(_sentences(60, 2)) + "\n", encoding="utf-8")
    with open(root / "valid.jsonl", "w", encoding="utf-8") as f:
        for line in _sentences(60, 3):
            f.write(json.dumps({"text": line}) + "\n")
    return root


@pytest.fixture(scope="module")
def adapter(ws: Path) -> Path:
    proc = run_cli(
        "adapt",
        "--model",
        "tiny",
        "--max-rank",
        MAX_RANK,
        "--granularity",
        GRANULARITY,
        "--output",
        "adapter",
        "--json",
        cwd=ws,
    )
    data = json.loads(proc.stdout)
    assert data["layers"] == 14 and data["max_rank_counts"] == {MAX_RANK: 14}
    return ws / "adapter"


@pytest.fixture(scope="module")
def stats(ws: Path) -> Path:
    proc = run_cli(
        "calibrate",
        "--model",
        "tiny",
        "--data",
        "train.txt",
        "--seq-len",
        "16",
        "--max-tokens",
        "512",
        "--output",
        "stats",
        "--json",
        cwd=ws,
    )
    data = json.loads(proc.stdout)
    assert data["layers"] == 14
    assert (ws / "stats" / "stats.json").is_file()
    return ws / "stats"


@pytest.fixture
def in_process():
    """Run ``main`` in this process, restoring the global state it configures (logging, warnings, tqdm)."""
    from nsn_peft.cli.runtime import set_progress

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    with warnings.catch_warnings():
        yield main
    root.setLevel(level)
    root.handlers[:] = handlers
    set_progress(True)


# --- help, parsing, config -------------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_shows_an_example(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: nsn-peft {command}" in out
    assert "examples:" in out and f"nsn-peft {command} --" in out
    assert "--config" in out and "--json" in out


def test_top_level_help_lists_all_commands(capsys):
    parser, commands = build_parser()
    assert sorted(commands) == sorted(COMMANDS)
    assert main([]) == 2
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["adapt", "--max-rank", "0", "--output", "x"], "--max-rank: must be >= 1"),
        (["adapt", "--max-rank", "abc", "--output", "x"], "expected a positive integer"),
        (["eval", "--ranks", "64,-1", "--data", "d.txt"], "must be >= 1"),
        (["eval", "--fractions", "0.5,1.5", "--data", "d.txt"], "must be in (0, 1]"),
        (["infer", "--target-flops", "0", "--prompt", "x"], "must be in (0, 1]"),
        (["search-ranks", "--target-fraction", "2"], "must be in (0, 1]"),
        (["adapt", "--init", "qr"], "invalid choice"),
        (["info", "--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_values_are_usage_errors(argv, fragment, in_process, capsys):
    assert in_process(argv) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err, argv[0], fragment)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["adapt", "--model", "./no/such/model", "--output", "out"], "model not found: ./no/such/model"),
        (["adapt", "--model", "missing.gguf", "--output", "out"], "model not found: missing.gguf"),
        (["adapt", "--init", "whitened", "--output", "out"], "needs activation statistics"),
        (["adapt", "--init", "whitened", "--stats", "no_stats", "--output", "out"], "stats folder not found: no_stats"),
        (["adapt", "--rank-plan", "no_plan.json", "--output", "out"], "rank plan not found: no_plan.json"),
        (["adapt", "--model", "tiny"], "required: --output"),
        (["eval", "--adapter", "adapter", "--data", "missing.txt"], "data not found: missing.txt"),
        (["eval", "--adapter", "no_adapter", "--data", "valid.txt"], "adapter folder not found: no_adapter"),
        (["eval", "--adapter", "tiny", "--data", "valid.txt"], "not an adapter folder"),
        (["info", "--adapter", "no_adapter"], "adapter folder not found"),
        (["info"], "required: --adapter"),
        (["infer", "--adapter", "adapter", "--prompt-file", "no_prompt.txt"], "prompt file not found"),
        (["infer", "--adapter", "adapter", "--rank", "8", "--fraction", "0.5", "--prompt", "x"], "at most one of"),
        (["calibrate", "--data", "missing.jsonl", "--output", "s"], "data not found: missing.jsonl"),
        (
            ["search-ranks", "--stats", "stats_missing", "--target-fraction", "0.5", "--output", "p.json"],
            "stats folder not found",
        ),
        (["search-ranks", "--target-fraction", "0.5", "--epsilon", "0.1", "--output", "p.json"], "exactly one of"),
        (["train", "--adapter", "adapter", "--output", "t"], "required: --data"),
        (["sweep", "--adapter", "adapter", "--data", "valid.txt"], "required: --output-dir"),
        (["adapt", "--config", "nope.yaml", "--output", "out"], "config file not found: nope.yaml"),
    ],
)
def test_missing_inputs_are_usage_errors_without_outputs(argv, fragment, ws, adapter, in_process, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    before = entries(ws)
    assert in_process(argv) == 2
    assert_one_line_error(capsys.readouterr().err, argv[0], fragment)
    assert entries(ws) == before


def test_existing_output_needs_overwrite(ws, adapter, in_process, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    assert in_process(["adapt", "--model", "tiny", "--output", "adapter"]) == 2
    assert_one_line_error(capsys.readouterr().err, "adapt", "pass --overwrite")


def test_config_file_supplies_defaults_and_flags_override(ws, adapter, in_process, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ws)
    config = tmp_path / "info.yaml"
    config.write_text(yaml.safe_dump({"adapter": "adapter", "ranks": [16], "layers": True, "json": True}))
    assert in_process(["info", "--config", str(config)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["rank"] for row in data["flops_table"]] == [16]
    assert len(data["layers"]) == 14
    assert in_process(["info", "--config", str(config), "--ranks", "16,full"]) == 0  # the flag wins
    data = json.loads(capsys.readouterr().out)
    assert [row["rank"] for row in data["flops_table"]] == [16, 32]
    sections = tmp_path / "all.json"  # one section per command
    sections.write_text(json.dumps({"info": {"adapter": "adapter", "json": True}, "eval": {"ranks": "8"}}))
    assert in_process(["info", "--config", str(sections)]) == 0
    assert json.loads(capsys.readouterr().out)["num_layers"] == 14


@pytest.mark.parametrize(
    "content, fragment",
    [
        ({"adapter": "adapter", "max_rnak": 3}, "unknown key 'max_rnak'"),
        ({"adapter": "adapter", "ranks": "0"}, "must be >= 1"),
        ({"adapter": "adapter", "layers": "yes"}, "must be true or false"),
        (["adapter"], "must hold a mapping"),
    ],
)
def test_bad_config_files_are_usage_errors(content, fragment, ws, adapter, in_process, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ws)
    config = tmp_path / "bad.json"
    config.write_text(json.dumps(content))
    assert in_process(["info", "--config", str(config)]) == 2
    assert_one_line_error(capsys.readouterr().err, "info", fragment)


# --- every subcommand end to end ---------------------------------------------------------------------------
def test_adapt_writes_a_loadable_adapter(adapter):
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "NSN" and config["max_rank"] == 32 and config["rank_granularity"] == 16
    assert Path(config["base_model_name_or_path"]).name == "tiny"
    assert (adapter / "adapter_model.safetensors").is_file() and "## NSN adapter" in (adapter / "README.md").read_text()
    assert not [p for p in adapter.parent.iterdir() if p.name.startswith(".adapter")]  # no temporaries left


def test_info_reads_the_folder_only(adapter, ws, in_process, capsys, monkeypatch):
    proc = run_cli("info", "--adapter", "adapter", "--ranks", "16,full", "--json", cwd=ws)
    data = json.loads(proc.stdout)
    assert data["num_layers"] == 14 and data["rank_granularity"] == 16
    assert data["factor_params"] == sum(32 * (r["out_features"] + r["in_features"]) for r in data["layers"])
    rank16, full = data["flops_table"]
    assert rank16["rank"] == 16 and full["rank"] == 32
    assert full["flops_fraction"] == pytest.approx(2 * rank16["flops_fraction"])
    monkeypatch.chdir(ws)
    assert in_process(["info", "--adapter", "adapter", "--layers"]) == 0
    text = capsys.readouterr().out
    assert "FLOPs of the factored layers" in text and "model.layers.1.mlp.down_proj" in text


def test_infer_from_adapter_at_rank(adapter, ws):
    proc = run_cli(
        "infer",
        "--adapter",
        "adapter",
        "--rank",
        "16",
        "--prompt",
        "the model",
        "--max-new-tokens",
        "4",
        "--json",
        cwd=ws,
    )
    data = json.loads(proc.stdout)
    assert data["max_rank"] == 16 and data["min_rank"] == 16 and 1 <= data["new_tokens"] <= 4
    assert isinstance(data["completion"], str) and data["chat_template"] is False


def test_infer_adapts_on_the_fly_with_config_and_target_flops(ws, tmp_path):
    config = tmp_path / "infer.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "tiny",
                "max_rank": 32,
                "granularity": 16,
                "target_flops": 0.6,
                "prompt": "the rank",
                "max_new_tokens": 5,
            }
        )
    )
    proc = run_cli("infer", "--config", config, "--max-new-tokens", "1", "--json", cwd=ws)
    data = json.loads(proc.stdout)
    assert data["kind"] == "flops" and data["selected_rank"] == 16 and data["model_flops_fraction"] <= 0.6
    assert data["new_tokens"] == 1  # the flag overrides the config's max_new_tokens


def test_eval_at_several_ranks(adapter, ws):
    proc = run_cli(
        "eval",
        "--adapter",
        "adapter",
        "--data",
        "valid.jsonl",
        "--ranks",
        "16,full",
        "--fractions",
        "0.5",
        "--target-flops",
        "0.6",
        "--baseline",
        "--seq-len",
        "16",
        "--max-tokens",
        "256",
        "--output",
        "eval.json",
        "--json",
        cwd=ws,
    )
    data = json.loads(proc.stdout)
    labels = [r["label"] for r in data["results"]]
    assert labels == ["16", "full", "fraction=0.5", "flops<=0.6"]
    ppl = {r["label"]: r["perplexity"] for r in data["results"]}
    assert all(v > 1 for v in ppl.values())
    assert ppl["16"] == pytest.approx(ppl["fraction=0.5"]) == pytest.approx(ppl["flops<=0.6"])
    assert data["baseline_perplexity"] > 1
    assert json.loads((ws / "eval.json").read_text())["results"] == data["results"]


def test_sweep_writes_csv_plot_and_json(adapter, ws):
    proc = run_cli(
        "sweep",
        "--adapter",
        "adapter",
        "--data",
        "valid.txt",
        "--seq-len",
        "16",
        "--max-tokens",
        "256",
        "--baseline",
        "--x",
        "flops",
        "--output-dir",
        "sweep",
        "--json",
        cwd=ws,
    )
    data = json.loads(proc.stdout)
    assert [r["mean_rank"] for r in data["results"]] == [16, 32]
    with open(ws / "sweep" / "sweep.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["16", "32", "dense"] and float(rows[0]["perplexity"]) > 1
    assert (ws / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((ws / "sweep" / "sweep.json").read_text())["x"] == "flops"
    assert sorted(entries(ws / "sweep")) == ["sweep.csv", "sweep.json", "sweep.png"]


def test_calibrate_search_adapt_planned_and_compress(stats, ws, in_process, capsys, monkeypatch):
    meta = json.loads((stats / "stats.json").read_text())
    assert len(meta["layers"]) == 14
    proc = run_cli(
        "search-ranks",
        "--model",
        "tiny",
        "--stats",
        "stats",
        "--target-fraction",
        "0.5",
        "--output",
        "plan.json",
        "--json",
        cwd=ws,
    )
    plan = json.loads(proc.stdout)
    assert plan["mode"] == "budget" and plan["init"] == "whitened" and (ws / "plan.json").is_file()
    assert plan["parameter_fraction"] <= 0.5 + 1e-9
    proc = run_cli(
        "adapt",
        "--model",
        "tiny",
        "--stats",
        "stats",
        "--rank-plan",
        "plan.json",
        "--granularity",
        GRANULARITY,
        "--output",
        "planned",
        "--json",
        cwd=ws,
    )
    adapted = json.loads(proc.stdout)
    assert adapted["init"] == "whitened"  # the plan's init (no --init given)
    assert adapted["layers"] == len(plan["ranks"])
    assert sorted(map(int, adapted["max_rank_counts"])) == sorted(set(plan["ranks"].values()))
    proc = run_cli("compress", "--adapter", "planned", "--output", "compressed", "--json", cwd=ws)
    compressed = json.loads(proc.stdout)
    assert compressed["factored_params"] < compressed["dense_params"]
    assert (ws / "compressed" / "modeling_nsn.py").is_file() and (ws / "compressed" / "tokenizer.json").is_file()
    monkeypatch.chdir(ws)
    assert in_process(["info", "--adapter", "compressed", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["factor_params"] == compressed["factored_params"]
    proc = run_cli(
        "eval",
        "--model",
        "compressed",
        "--data",
        "valid.txt",
        "--seq-len",
        "16",
        "--max-tokens",
        "256",
        "--json",
        cwd=ws,
    )
    (row,) = json.loads(proc.stdout)["results"]
    assert row["label"] == "compressed" and row["perplexity"] > 1
    assert row["model_flops_fraction"] == pytest.approx(compressed["model_flops_fraction"])


def test_search_ranks_epsilon_mode(stats, ws):
    proc = run_cli(
        "search-ranks",
        "--model",
        "tiny",
        "--stats",
        "stats",
        "--epsilon",
        "0.05",
        "--data",
        "valid.txt",
        "--seq-len",
        "16",
        "--max-tokens",
        "256",
        "--max-steps",
        "2",
        "--output",
        "plan_eps.json",
        "--json",
        cwd=ws,
    )
    plan = json.loads(proc.stdout)
    assert plan["mode"] == "epsilon" and plan["init"] == "projected" and plan["target"]["epsilon"] == 0.05
    assert (ws / "plan_eps.json").is_file()


def test_train_a_few_steps(adapter, ws):
    proc = run_cli(
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
        "--logging-steps",
        "1",
        "--output",
        "trained",
        "--json",
        cwd=ws,
    )
    data = json.loads(proc.stdout)
    assert data["steps"] == 2 and data["training_loss"] > 0
    assert (ws / "trained" / "adapter_model.safetensors").is_file()
    assert not (ws / "trained-checkpoints").exists() or not any((ws / "trained-checkpoints").iterdir())


# --- runtime failures: exit 1, one line, nothing written ------------------------------------------------------
def test_stats_from_another_model_is_a_runtime_error(ws, adapter, in_process, capsys, monkeypatch):
    from nsn_peft import ActivationStats

    other = ActivationStats(
        {"model.layers.0.mlp.up_proj": torch.eye(48, dtype=torch.float64)},
        {"model.layers.0.mlp.up_proj": 10},
        model_id="other",
    )
    other.save(ws / "other_stats")
    before = entries(ws)
    proc = run_cli(
        "adapt",
        "--model",
        "tiny",
        "--init",
        "whitened",
        "--stats",
        "other_stats",
        "--output",
        "whitened",
        cwd=ws,
        expect=1,
    )
    assert_one_line_error(proc.stderr, "adapt", "do not match this model")
    assert entries(ws) == before
    monkeypatch.chdir(ws)
    capsys.readouterr()
    argv = [
        "adapt",
        "--model",
        "tiny",
        "--init",
        "whitened",
        "--stats",
        "other_stats",
        "--output",
        "whitened",
        "--debug",
    ]
    assert in_process(argv) == 1
    assert "Traceback" in capsys.readouterr().err  # --debug shows it
    assert entries(ws) == before


def test_unknown_module_and_too_large_rank_after_loading(ws, adapter, in_process, capsys, monkeypatch):
    before = entries(ws)
    proc = run_cli(
        "adapt", "--model", "tiny", "--target-modules", "q_proj,qkv_proj", "--output", "bad", cwd=ws, expect=2
    )
    assert_one_line_error(proc.stderr, "adapt", "qkv_proj match(es) no linear layer")
    monkeypatch.chdir(ws)
    assert (
        in_process(["eval", "--adapter", "adapter", "--data", "valid.txt", "--ranks", "64", "--output", "e.json"]) == 2
    )
    assert_one_line_error(capsys.readouterr().err, "eval", "rank 64 exceeds the adapter's largest max rank (32)")
    assert in_process(["adapt", "--model", "tiny", "--exclude-modules", "nope_proj", "--output", "bad"]) == 2
    assert_one_line_error(capsys.readouterr().err, "adapt", "--exclude-modules: nope_proj")
    assert entries(ws) == before


def test_console_script_and_module_entry_point(ws):
    script = shutil.which("nsn-peft") or str(Path(sys.executable).parent / "nsn-peft")
    proc = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("nsn-peft ")  # (python -m nsn_peft: every other test)


@pytest.mark.slow
def test_infer_on_embedded_smollm2_at_half_flops(tmp_path):
    proc = run_cli(
        "infer",
        "--max-rank",
        "256",
        "--target-flops",
        "0.5",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "8",
        "--json",
        cwd=tmp_path,
    )
    data = json.loads(proc.stdout)
    assert data["model_flops_fraction"] <= 0.5 and data["chat_template"] is True


def test_calibrate_with_gradients_feeds_loss_weighted_budget_search(ws):
    proc = run_cli(
        "calibrate",
        "--model",
        "tiny",
        "--data",
        "train.txt",
        "--seq-len",
        "16",
        "--max-tokens",
        "256",
        "--gradients",
        "--gradient-tokens",
        "128",
        "--output",
        "stats_grad",
        "--json",
        cwd=ws,
    )
    data = json.loads(proc.stdout)
    assert data["gradient_tokens"] == 128
    assert sorted(entries(ws / "stats_grad")) == ["activation_stats.safetensors", "output_gradients", "stats.json"]
    proc = run_cli(
        "search-ranks",
        "--model",
        "tiny",
        "--stats",
        "stats_grad",
        "--target-fraction",
        "0.5",
        "--output",
        "plan_grad.json",
        "--json",
        cwd=ws,
    )
    plan = json.loads(proc.stdout)
    assert plan["target"]["weighting"] == "output_gradient" and plan["parameter_fraction"] <= 0.5 + 1e-9
    proc = run_cli(
        "search-ranks",
        "--model",
        "tiny",
        "--stats",
        "stats_grad",
        "--target-fraction",
        "0.5",
        "--no-gradients",
        "--output",
        "plan_plain.json",
        "--json",
        cwd=ws,
    )
    assert json.loads(proc.stdout)["target"]["weighting"] == "output_error"
    # Output-gradient statistics are not input Grams: using them as activation stats is refused.
    proc = run_cli(
        "adapt",
        "--model",
        "tiny",
        "--init",
        "whitened",
        "--stats",
        "stats_grad/output_gradients",
        "--output",
        "bad",
        cwd=ws,
        expect=1,
    )
    assert "output_gradient statistics, not activation statistics" in proc.stderr and not (ws / "bad").exists()


# --- trust: clear errors before loading, outputs with normal modes ---------------------------------------------
def test_eval_on_too_little_text_is_a_usage_error(ws, adapter, in_process, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ws)
    short = tmp_path / "short.txt"
    short.write_text("the model runs fast .\n")
    from nsn_peft import hub

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although the data is obviously too short")

    with monkeypatch.context() as patch:
        patch.setattr(hub, "load_model_and_tokenizer", no_loading)
        assert in_process(["eval", "--adapter", "adapter", "--data", str(short)]) == 2
        assert_one_line_error(capsys.readouterr().err, "eval", "fewer than --seq-len 512: not one full window")
    # Short enough only once tokenised: found right after loading, before any evaluation.
    assert in_process(["eval", "--adapter", "adapter", "--data", str(short), "--seq-len", "32"]) == 2
    assert_one_line_error(capsys.readouterr().err, "eval", "gives 6 tokens, fewer than --seq-len 32")


def test_misspelt_config_section_is_named_with_the_commands(ws, adapter, in_process, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ws)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"info": {"adapter": "adapter"}, "evall": {"ranks": "8"}}))
    assert in_process(["info", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err, "info", f"config file {config}: section 'evall' is not a command; did you mean 'eval'?")
    assert "commands: adapt, calibrate" in err
    config.write_text(yaml.safe_dump({"infoo": {"adapter": "adapter"}}))
    assert in_process(["info", "--config", str(config)]) == 2
    assert_one_line_error(capsys.readouterr().err, "info", "section 'infoo' is not a command; did you mean 'info'?")


def test_corrupt_statistics_and_adapter_files_are_named_before_loading(
    ws, adapter, stats, in_process, capsys, monkeypatch
):
    monkeypatch.chdir(ws)
    shutil.copytree(stats, ws / "broken_stats")
    tensors = ws / "broken_stats" / "activation_stats.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-64])
    shutil.copytree(adapter, ws / "broken_adapter")
    weights = ws / "broken_adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    from nsn_peft import hub

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the files were checked")

    monkeypatch.setattr(hub, "load_model_and_tokenizer", no_loading)
    assert (
        in_process(["adapt", "--model", "tiny", "--init", "whitened", "--stats", "broken_stats", "--output", "w"]) == 2
    )
    assert_one_line_error(capsys.readouterr().err, "adapt", "broken_stats/activation_stats.safetensors is truncated")
    assert in_process(["eval", "--adapter", "broken_adapter", "--data", "valid.txt"]) == 2
    assert_one_line_error(capsys.readouterr().err, "eval", "broken_adapter/adapter_model.safetensors is truncated")
    assert not (ws / "w").exists()


def test_outputs_get_the_umask_modes(adapter, stats):
    mask = os.umask(0)
    os.umask(mask)
    for folder in (adapter, stats):
        for path in [folder, *folder.rglob("*")]:
            expected = (0o777 if path.is_dir() else 0o666) & ~mask
            assert path.stat().st_mode & 0o777 == expected, path


def test_compress_refine_resumable_and_loadable(ws):
    args = [
        "compress",
        "--model",
        "tiny",
        "--refine",
        "--budget",
        "0.5",
        "--data",
        "train.txt",
        "--seq-len",
        "16",
        "--max-tokens",
        "640",
        "--batch-size",
        "4",
        "--e2e-tokens",
        "256",
        "--refine-state",
        "refine-state",
        "--output",
        "refined",
        "--json",
    ]
    proc = run_cli(*args, cwd=ws)
    data = json.loads(proc.stdout)
    assert data["allocation"] in ("mixed", "uniform") and not data["resumed"]
    assert set(data["validation_nll"]) == {"dense", "init", "blockwise", "end_to_end"}
    assert (ws / "refined" / "modeling_nsn.py").is_file()
    assert (ws / "refine-state" / "refine_state.json").is_file()
    proc = run_cli(*args, "--overwrite", cwd=ws)  # a finished state is reused, not retrained
    assert json.loads(proc.stdout)["resumed"]
    proc = run_cli(
        "eval", "--model", "refined", "--data", "valid.txt", "--seq-len", "16", "--max-tokens", "256", "--json", cwd=ws
    )
    assert json.loads(proc.stdout)["results"][0]["perplexity"] > 1
    proc = run_cli("compress", "--model", "tiny", "--refine", "--data", "train.txt", "--output", "x", cwd=ws, expect=2)
    assert_one_line_error(proc.stderr, "compress", "--refine needs --budget")


def test_compress_refine_budgets_saves_one_adapter_for_every_budget(ws):
    args = [
        "compress",
        "--model",
        "tiny",
        "--refine",
        "--budgets",
        "0.5,0.8",
        "--data",
        "train.txt",
        "--seq-len",
        "16",
        "--max-tokens",
        "640",
        "--batch-size",
        "4",
        "--e2e-tokens",
        "256",
        "--blockwise-epochs",
        "0",
        "--allocation",
        "uniform",
        "--output",
        "ladder",
        "--json",
    ]
    data = json.loads(run_cli(*args, cwd=ws).stdout)
    assert data["budgets"] == [0.5, 0.8] and set(data["validation_nll_per_budget"]["end_to_end"]) == {"0.5", "0.8"}
    saved = json.loads((ws / "ladder" / "adapter_config.json").read_text())
    assert saved["budget_plans"] == data["budget_plans"]
    for budget in ("0.5", "0.8"):
        proc = run_cli(
            "eval",
            "--adapter",
            "ladder",
            "--target-flops",
            budget,
            "--data",
            "valid.txt",
            "--seq-len",
            "16",
            "--max-tokens",
            "256",
            "--json",
            cwd=ws,
        )
        assert json.loads(proc.stdout)["results"][0]["perplexity"] > 1
    proc = run_cli(
        "compress",
        "--model",
        "tiny",
        "--refine",
        "--budgets",
        "0.8,0.5",
        "--data",
        "train.txt",
        "--output",
        "x",
        cwd=ws,
        expect=2,
    )
    assert_one_line_error(proc.stderr, "compress", "not sorted")
    proc = run_cli(
        "compress",
        "--model",
        "tiny",
        "--refine",
        "--budget",
        "0.5",
        "--budgets",
        "0.5,0.8",
        "--output",
        "x",
        cwd=ws,
        expect=2,
    )
    assert_one_line_error(proc.stderr, "compress", "not both")


def test_target_flops_uses_the_budget_plans(ws, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import nsn_peft
    from nsn_peft import NSNConfig

    base = AutoModelForCausalLM.from_pretrained(ws / "tiny")
    names = [n for n, m in base.named_modules() if n.endswith(("up_proj", "down_proj"))]
    plans = {0.5: dict.fromkeys(names, 8), 1.0: dict.fromkeys(names, 16)}
    model = get_peft_model(base, NSNConfig(target_modules=["up_proj", "down_proj"], max_rank=16, budget_plans=plans))
    model.save_pretrained(tmp_path / "scheduled")
    proc = run_cli(
        "compress",
        "--adapter",
        tmp_path / "scheduled",
        "--model",
        "tiny",
        "--target-flops",
        "0.5",
        "--output",
        tmp_path / "c50",
        "--json",
        cwd=ws,
    )
    assert json.loads(proc.stdout)["mean_rank"] == 8
    proc = run_cli(
        "compress",
        "--adapter",
        tmp_path / "scheduled",
        "--model",
        "tiny",
        "--target-flops",
        "0.3",
        "--output",
        tmp_path / "c30",
        cwd=ws,
        expect=2,
    )
    assert_one_line_error(proc.stderr, "compress", "has plans for the FLOPs budgets 0.5, 1")
    assert set(json.loads((tmp_path / "c50" / "config.json").read_text())["nsn_max_ranks"].values()) == {8}
    # No rank chosen: a nested export, every budget in one folder.
    proc = run_cli(
        "compress",
        "--adapter",
        tmp_path / "scheduled",
        "--model",
        "tiny",
        "--output",
        tmp_path / "nested",
        "--json",
        cwd=ws,
    )
    assert json.loads(proc.stdout)["budgets"] == [0.5, 1.0]
    config = json.loads((tmp_path / "nested" / "config.json").read_text())
    assert sorted(config["nsn_budget_plans"], key=float) == ["0.5", "1"] and set(config["nsn_max_ranks"].values()) == {
        16
    }
    proc = run_cli(
        "eval",
        "--adapter",
        tmp_path / "scheduled",
        "--model",
        "tiny",
        "--data",
        "valid.txt",
        "--seq-len",
        "16",
        "--max-tokens",
        "256",
        "--target-flops",
        "0.5,1",
        "--json",
        cwd=ws,
    )
    rows = json.loads(proc.stdout)["results"]
    assert [r["mean_rank"] for r in rows] == [8, 16]
    assert nsn_peft.get_rank(model) == dict.fromkeys(names, 16)


def test_serving_from_factors_only(ws, adapter, tmp_path):
    """eval without the dense baseline runs from factors only; the baseline needs the dense weights."""
    proc = run_cli(
        "eval",
        "--adapter",
        adapter,
        "--model",
        "tiny",
        "--data",
        "valid.txt",
        "--seq-len",
        "16",
        "--max-tokens",
        "256",
        "--ranks",
        "8",
        "--no-keep-base-weights",
        "--json",
        cwd=ws,
    )
    data = json.loads(proc.stdout)
    assert data["baseline_perplexity"] is None and data["results"][0]["perplexity"] > 1  # skipped, not an error
    kept = run_cli(
        "eval",
        "--adapter",
        adapter,
        "--model",
        "tiny",
        "--data",
        "valid.txt",
        "--seq-len",
        "16",
        "--max-tokens",
        "256",
        "--ranks",
        "8",
        "--json",
        cwd=ws,
    )
    assert json.loads(kept.stdout)["results"][0]["perplexity"] == pytest.approx(
        data["results"][0]["perplexity"], rel=1e-5
    )
    proc = run_cli(
        "eval",
        "--adapter",
        adapter,
        "--model",
        "tiny",
        "--data",
        "valid.txt",
        "--baseline",
        "--no-keep-base-weights",
        cwd=ws,
        expect=2,
    )
    assert_one_line_error(proc.stderr, "eval", "--baseline evaluates the dense model")
    proc = run_cli(
        "adapt",
        "--model",
        "tiny",
        "--max-rank",
        "break-even",
        "--granularity",
        "8",
        "--output",
        tmp_path / "be",
        "--json",
        cwd=ws,
    )
    assert json.loads(proc.stdout)["max_rank"] == "break-even"
    config = json.loads((tmp_path / "be" / "adapter_config.json").read_text())
    assert config["max_rank"] == "break-even"
