"""Sequence classification with an NSN adapter: train once at several ranks, measure accuracy at any rank.

The task (offline, no download): tell which part of the Python documentation a paragraph comes from —
``tutorial``, ``faq`` or ``reference`` (the reStructuredText sources installed with Python). The classifier is
SmolLM2-135M with a sequence-classification head; its linear layers become NSN factors and the head is trained
in full (``modules_to_save``). Training uses ``NSNTrainer`` with the sandwich rank sampler, so the same weights
are then evaluated at ``--rank`` and at the full max rank. Bring your own data with ``--data file.jsonl``
(records ``{"text": ..., "label": ...}``, labels as strings or ints).

    # on an H100: a few minutes
    python examples/sequence_classification.py --device cuda --max-steps 300 --rank 128
    # a CPU smoke test on a local model
    python examples/sequence_classification.py --model ./tiny-model --max-steps 2 --max-examples 16 --seq-len 32
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger("sequence_classification")

PYTHON_DOCS = Path(f"/usr/share/doc/python3.{sys.version_info.minor}/html/_sources")
DEFAULT_CLASSES = ("tutorial", "faq", "reference")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model id/folder/.gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="JSONL with text/label records (default: Python docs sections)")
    p.add_argument("--max-rank", type=int, default=256, help="max rank of the NSN factors")
    p.add_argument("--granularity", type=int, default=64, help="rank grid step")
    p.add_argument("--rank", default="128", help="rank to report accuracy at (int or 'full'; clamped to the max)")
    p.add_argument("--max-examples", type=int, default=400, help="examples per class (train + test)")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.max_rank < 1 or args.granularity < 1 or args.max_steps < 1 or args.max_examples < 2:
        p.error("--max-rank, --granularity, --max-steps must be >= 1 and --max-examples >= 2")
    if args.rank != "full" and (not args.rank.isdigit() or int(args.rank) < 1):
        p.error(f"--rank must be a positive int or 'full', got {args.rank!r}")
    if not 0 < args.test_fraction < 1:
        p.error("--test-fraction must be in (0, 1)")
    return args


def docs_paragraphs(folder: Path, limit: int, rng: random.Random) -> list[str]:
    """Prose paragraphs (≥ 200 characters, no directives or code) of the .rst sources under ``folder``."""
    paragraphs = []
    for path in sorted(folder.rglob("*.txt")):
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            text = " ".join(block.split())
            if len(text) >= 200 and not text.startswith(("..", ">>>", "::", "=", "-", "*")) and "::" not in text[:40]:
                paragraphs.append(text)
    rng.shuffle(paragraphs)
    return paragraphs[:limit]


def load_examples(args: argparse.Namespace, rng: random.Random) -> tuple[list[str], list[int], list[str]]:
    """``(texts, label ids, label names)`` from ``--data`` or the Python docs."""
    if args.data:
        records = [
            json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        names = sorted({str(r["label"]) for r in records})
        by_label: dict[str, list[str]] = {n: [] for n in names}
        for r in records:
            by_label[str(r["label"])].append(str(r["text"]))
        for texts in by_label.values():
            rng.shuffle(texts)
    else:
        if not PYTHON_DOCS.is_dir():
            raise SystemExit(f"{PYTHON_DOCS} not found: pass --data file.jsonl with text/label records")
        names = list(DEFAULT_CLASSES)
        by_label = {n: docs_paragraphs(PYTHON_DOCS / n, args.max_examples, rng) for n in names}
    texts, labels = [], []
    for i, name in enumerate(names):
        for text in by_label[name][: args.max_examples]:
            texts.append(text)
            labels.append(i)
    if len(names) < 2:
        raise SystemExit("need at least two labels")
    return texts, labels, names


def split(texts: list[str], labels: list[int], test_fraction: float, rng: random.Random):
    order = list(range(len(texts)))
    rng.shuffle(order)
    cut = max(1, int(len(order) * test_fraction))
    test, train = order[:cut], order[cut:]
    pick = lambda idx: ([texts[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    return pick(train), pick(test)


def encode(tokenizer: Any, texts: list[str], labels: list[int], seq_len: int):
    import datasets

    enc = tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length")
    return datasets.Dataset.from_dict(
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
    )


def accuracy(model: Any, dataset: Any, batch_size: int, device: Any) -> float:
    import torch

    correct = 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            batch = dataset[start : start + batch_size]
            ids = torch.tensor(batch["input_ids"], device=device)
            mask = torch.tensor(batch["attention_mask"], device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            correct += int((logits.argmax(-1).cpu() == torch.tensor(batch["labels"])).sum())
    return correct / len(dataset)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    import torch
    from peft import get_peft_model
    from transformers import TrainingArguments, default_data_collator

    import nsn_peft
    from nsn_peft.hub import load_model_and_tokenizer
    from nsn_peft.training import NSNTrainer, make_rank_sampler

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    texts, labels, names = load_examples(args, rng)
    (train_x, train_y), (test_x, test_y) = split(texts, labels, args.test_fraction, rng)
    logger.info(
        "%d train / %d test examples, classes %s", len(train_x), len(test_x), dict(Counter(names[i] for i in labels))
    )

    base, tokenizer = load_model_and_tokenizer(
        args.model, task="sequence-classification", num_labels=len(names), device=device
    )
    base.config.pad_token_id = tokenizer.pad_token_id
    config = nsn_peft.NSNConfig(max_rank=args.max_rank, rank_granularity=args.granularity, task_type="SEQ_CLS")
    model = get_peft_model(base, config)  # SEQ_CLS: the classification head is trained in full (modules_to_save)
    grid = model.selectable_ranks()
    rank = grid[-1] if args.rank == "full" else min(int(args.rank), grid[-1])

    train_set, test_set = (
        encode(tokenizer, train_x, train_y, args.seq_len),
        encode(tokenizer, test_x, test_y, args.seq_len),
    )
    before = accuracy(model, test_set, args.batch_size, device)
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="nsn-seqcls-"),  # nothing is saved there (save_strategy="no")
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        seed=args.seed,
        disable_tqdm=True,
        bf16=device.startswith("cuda") and torch.cuda.is_bf16_supported(),
    )
    trainer = NSNTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        data_collator=default_data_collator,
        rank_sampler=make_rank_sampler("sandwich", num_random=1, seed=args.seed),
    )
    trainer.train()

    results = {
        "classes": names,
        "train": len(train_set),
        "test": len(test_set),
        "accuracy_before_training": before,
        "at_rank": {},
    }
    for r in sorted({rank, grid[-1], grid[0]}):
        with nsn_peft.at_rank(model, r):
            acc = accuracy(model, test_set, args.batch_size, device)
            flops = model.estimate_flops().model_fraction
        results["at_rank"][str(r)] = {"accuracy": acc, "model_flops_fraction": flops}
        print(f"rank {r:>5}: accuracy {acc:.3f}  ({flops:.2f} of dense FLOPs)")
    print(f"chance: {1 / len(names):.3f}; before training (max rank): {before:.3f}")
    if args.output:
        from nsn_peft.io import write_json

        write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
