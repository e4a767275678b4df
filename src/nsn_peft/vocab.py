"""Token ids checked against the model's vocabulary where nsn-peft takes them in (perplexity, the CLI's prompts).

An id outside the embedding table otherwise ends deep in PyTorch as ``IndexError: index out of range in self``
(on CUDA, a device-side assert that poisons the process). Checked on the CPU tensor before it goes to the
device, so the model's forward pays nothing.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .errors import TokenIdError

__all__ = ["check_token_ids", "vocab_size"]


def vocab_size(model: Any) -> Optional[int]:
    """Rows of the model's input embedding table (``config.vocab_size`` if it has none); ``None`` if unknown."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        embeddings = None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        rows = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(rows) if isinstance(rows, int) else None


def check_token_ids(model: Any, input_ids: torch.Tensor, source: str = "the input") -> None:
    """Raise :class:`~nsn_peft.errors.TokenIdError` naming the first id outside ``[0, vocab size)``."""
    size = vocab_size(model)
    if size is None or input_ids.numel() == 0:
        return
    bad = (input_ids < 0) | (input_ids >= size)
    if bool(bad.any()):
        first = int(input_ids[bad].reshape(-1)[0])
        raise TokenIdError(
            f"{source} holds token id {first}, outside the model's vocabulary of {size} ids (0..{size - 1}): "
            f"{int(bad.sum())} id(s) out of range. Is the tokenizer that of another model? Pass the model's own "
            "(tokenizer=... / --tokenizer), or resize the embeddings (model.resize_token_embeddings)."
        )
