"""A tiny multiple-choice task written as an lm-eval task folder, and tiny models that prefer one letter."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from tiny_models import char_tokenizer, tiny_llama
from torch import nn

TASK = "tiny_letters"
GOLD = "x"  # the right answer of every question, at a different position each time
WRONG = "a"  # a wrong answer present in every question

QUESTIONS = [
    ("Sky?", ["x", "a", "b"], 0),
    ("Sea?", ["a", "x", "c"], 1),
    ("Sun?", ["b", "a", "x"], 2),
    ("Ice?", ["a", "b", "c", "x"], 3),
    ("Owl?", ["x", "a"], 0),
    ("Fox?", ["c", "x", "a", "b"], 1),
]


def write_task(folder: Path, name: str = TASK) -> Path:
    """An lm-eval task folder holding ``name`` (YAML + JSONL); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": g}) + "\n" for q, c, g in QUESTIONS))
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(data)}},
        "output_type": "multiple_choice",
        "validation_split": "validation",
        "doc_to_text": "Q: {{question}}\nA:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


def letter_model(letter: str, strength: float = 8.0, seed: int = 0, mix: float = 0.0):
    """``(model, tokenizer)``: a tiny Llama whose next-token logits add ``strength`` to ``letter``.

    With ``mix=0`` the output head ignores the hidden states (every layer, at every rank, is irrelevant); with
    ``mix>0`` its random weights are kept, scaled by ``mix``, so compressing the layers changes the answers.
    """
    tok = char_tokenizer()
    model = tiny_llama(seed)
    hidden, vocab = model.lm_head.in_features, model.lm_head.out_features
    head = nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight * mix)
        head.bias.zero_()
        head.bias[tok.convert_tokens_to_ids(letter)] = strength
    model.lm_head = head
    model.config.tie_word_embeddings = False
    return model.eval(), tok
