"""What a multi-rank run adds to a Trainer checkpoint, and how a resumed run gets it back.

Every folder the trainer saves (checkpoints and ``save_model``) carries ``nsn_multirank_state.safetensors``
(log-variances, and the sharded runs' log-variance optimizer state) and ``nsn_multirank_state.json`` (weighting,
buckets, sampler state, per-rank step counts), written in one transaction without pickle. A resumed run restores
them after the Trainer restored its own state, so the rank draws and loss weights continue where they stopped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file
from torch import nn

from ..io import atomic_directory, finish_interrupted_save, write_json, write_safetensors
from .distributed import deepspeed_resume_directory, save_fsdp2_adapter, sharding_name

logger = logging.getLogger(__name__)

__all__ = ["MULTIRANK_STATE_JSON", "MULTIRANK_STATE_TENSORS", "MultiRankCheckpointMixin"]

MULTIRANK_STATE_TENSORS = "nsn_multirank_state.safetensors"
MULTIRANK_STATE_JSON = "nsn_multirank_state.json"
STATE_FORMAT_VERSION = 1


class MultiRankCheckpointMixin:
    """Checkpoint state of :class:`~nsn_peft.training.NSNTrainerMixin` (a ``Trainer`` mixin)."""

    def multirank_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, json)`` of the multi-rank state: log-variances; weighting, buckets, sampler, counts."""
        tensors = {
            "log_vars": self.rank_loss.log_vars.detach().float().cpu(),
            "fixed_weights": self.rank_loss.fixed_weights.detach().float().cpu(),
        }
        if self._logvar_optimizer is not None:
            tensors.update(self._logvar_optimizer.state_tensors())
        meta = {
            "format_version": STATE_FORMAT_VERSION,
            "weighting": self.rank_loss.weighting,
            "grid": list(self.rank_grid),
            "buckets": self.rank_buckets.to_dict(),
            "bucket_labels": self.bucket_labels(),
            "budgets": self.budgets,
            "distill_teacher": self.distill_teacher,
            "log_vars": self.rank_loss.log_vars.detach().tolist(),
            "sampler": self.rank_sampler.state_dict(),
            "rank_counts": {str(r): n for r, n in self.rank_counts.items()},
            "global_step": int(self.state.global_step),
            "distill_alpha": self.distill_alpha,
            "distill_temperature": self.distill_temperature,
        }
        return tensors, meta

    def save_multirank_state(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``nsn_multirank_state.safetensors`` + ``.json`` into ``directory`` (one transaction, no pickle)."""
        tensors, meta = self.multirank_state()
        with atomic_directory(directory) as staging:
            write_safetensors(
                staging / MULTIRANK_STATE_TENSORS, tensors, metadata={"format": "nsn-peft-multirank-state"}
            )
            write_json(staging / MULTIRANK_STATE_JSON, meta)

    def load_multirank_state(self, directory: Union[str, os.PathLike]) -> None:
        """Restore the state written by :meth:`save_multirank_state` (log-variances, sampler, counts)."""
        directory = Path(directory)
        finish_interrupted_save(directory)
        tensor_path, json_path = directory / MULTIRANK_STATE_TENSORS, directory / MULTIRANK_STATE_JSON
        if not tensor_path.is_file() or not json_path.is_file():
            raise FileNotFoundError(
                f"'{directory}' holds no multi-rank state ({MULTIRANK_STATE_TENSORS} and {MULTIRANK_STATE_JSON})"
            )
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"Corrupt {json_path}: {err}") from err
        if meta.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(
                f"{json_path} has format_version {meta.get('format_version')!r}; this version reads {STATE_FORMAT_VERSION}"
            )
        if meta.get("budgets") != self.budgets:
            raise ValueError(
                f"{json_path} was saved for FLOPs budgets {meta.get('budgets')}, this trainer trains {self.budgets}"
            )
        if meta.get("grid") != self.rank_grid:
            raise ValueError(
                f"{json_path} was saved for selectable ranks {meta.get('grid')}, this model has {self.rank_grid}"
            )
        if meta.get("buckets", {}).get("members") != self.rank_buckets.members:
            raise ValueError(
                f"{json_path} has rank buckets {meta.get('bucket_labels')}, this trainer {self.bucket_labels()}: "
                "pass the same num_rank_buckets as the run that saved it"
            )
        if meta.get("weighting") != self.rank_loss.weighting:
            raise ValueError(
                f"{json_path} was saved with weighting={meta.get('weighting')!r}, this trainer uses {self.rank_loss.weighting!r}"
            )
        tensors = load_file(str(tensor_path))
        log_vars = tensors.get("log_vars")
        if log_vars is None or tuple(log_vars.shape) != tuple(self.rank_loss.log_vars.shape):
            raise ValueError(
                f"{tensor_path}: log_vars missing or of the wrong shape (expected {tuple(self.rank_loss.log_vars.shape)})"
            )
        with torch.no_grad():
            self.rank_loss.log_vars.copy_(log_vars.to(self.rank_loss.log_vars))
        if self._logvar_optimizer is not None and not self._logvar_optimizer.load_state_tensors(tensors):
            logger.warning(
                "%s holds no log-variance optimizer state (saved by an unsharded run): it starts afresh", tensor_path
            )
        self.rank_sampler.load_state_dict(meta["sampler"])
        self.rank_counts = {r: int(meta.get("rank_counts", {}).get(str(r), 0)) for r in self.rank_grid}
        self._ranks_cache = None
        logger.info(
            "Restored multi-rank state from %s (log-variances %s)", directory, [round(v, 4) for v in log_vars.tolist()]
        )

    # -- Trainer hooks -----------------------------------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """The base ``save_model`` plus the multi-rank state (so every checkpoint folder carries it).

        Under FSDP2 the adapter is gathered from the shards (a collective call) and written in the ordinary
        single-file PEFT layout, loadable in one process on any device."""
        if sharding_name(self) == "fsdp2":
            save_fsdp2_adapter(self, output_dir if output_dir is not None else self.args.output_dir)
            if self.args.push_to_hub and not _internal_call:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        else:
            super().save_model(output_dir, _internal_call=_internal_call)  # type: ignore[misc]
        if self.args.should_save:
            self.save_multirank_state(output_dir if output_dir is not None else self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        self._load_multirank_state_or_warn(resume_from_checkpoint)

    def train(self, *args: Any, **kwargs: Any):
        """The base ``train`` (same arguments); ranks are drawn afresh from the (restored) global step."""
        self._ranks_cache = None
        resumed = deepspeed_resume_directory(self, args[0] if args else kwargs.get("resume_from_checkpoint"))
        if resumed is not None:  # Trainer resumes DeepSpeed without calling _load_from_checkpoint
            self._load_multirank_state_or_warn(resumed)
        return super().train(*args, **kwargs)  # type: ignore[misc]

    def _load_multirank_state_or_warn(self, resume_from_checkpoint: str) -> None:
        if (Path(resume_from_checkpoint) / MULTIRANK_STATE_JSON).is_file():
            self.load_multirank_state(resume_from_checkpoint)
        else:
            logger.warning(
                "Checkpoint %s has no %s: the rank log-variances and sampler start afresh",
                resume_from_checkpoint,
                MULTIRANK_STATE_JSON,
            )
