"""Distillation from the dense model: the teacher and the per-point loss, defined once.

The refinement recipe's end-to-end stage (:func:`nsn_peft.refine.refine_end_to_end`) and
``NSNTrainer(distill_teacher="dense")`` train the same thing: the nested factors at each operating point imitate
the dense model they were made from. Both take the teacher from :func:`dense_teacher_logits` (the same module with
its NSN layers bypassed, so no second copy is held) and each point's loss from :func:`teacher_distillation_loss`
(``T²·KL(teacher ‖ student)`` over the positions that count), so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

from ..tuner.dense import dense_model
from .loss import distillation_loss

__all__ = ["dense_teacher_logits", "output_logits", "teacher_distillation_loss"]


def output_logits(outputs: Any) -> torch.Tensor:
    """The logits of a model's outputs (a ``ModelOutput``/dict with ``logits``, or ``(loss, logits, ...)``)."""
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        if "logits" in outputs:
            return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and len(outputs) > 1:
        return outputs[1]
    raise ValueError("Distillation needs the model outputs to hold `logits`")


@torch.no_grad()
def dense_teacher_logits(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    nsn_model: Optional[nn.Module] = None,
    context: Optional[contextlib.AbstractContextManager] = None,
) -> torch.Tensor:
    """The dense model's logits on ``inputs`` (labels dropped), without gradients and without dropout.

    Args:
        model: What to call (may be a distributed wrapper around ``nsn_model``).
        inputs: The model's keyword inputs; ``labels``/``shift_labels`` are left out (the teacher needs no loss).
        nsn_model: The module holding the NSN layers to bypass; ``None`` = ``model``.
        context: Entered around the forward inside the bypass, e.g. bf16 autocast.
    """
    batch = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
    with dense_model(model if nsn_model is None else nsn_model), context or contextlib.nullcontext():
        outputs = model(**batch)
    return output_logits(outputs).detach()


def teacher_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    shift_labels: Optional[torch.Tensor] = None,
    normalizer: Optional[Union[torch.Tensor, float]] = None,
) -> torch.Tensor:
    """``T²·KL(teacher ‖ student)`` of one operating point, over the positions that count.

    Without labels every position counts (the recipe: the whole calibration sequence imitates the teacher). For
    ``(batch, seq, vocab)`` logits, ``shift_labels`` counts the positions whose label is not ``-100``; ``labels``
    (causal LM: position ``i`` predicts label ``i+1``, as in the model's own loss) drops the last position and the
    masked labels. ``normalizer`` divides the summed KL (``None``: the mean over counted positions).
    """
    mask = None
    if student_logits.dim() == 3:
        if shift_labels is not None:
            mask = shift_labels != -100
        elif labels is not None:
            mask = labels[..., 1:] != -100
            student_logits, teacher_logits = student_logits[..., :-1, :], teacher_logits[..., :-1, :]
    return distillation_loss(student_logits, teacher_logits, mask, temperature, normalizer)
