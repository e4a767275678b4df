"""What ``NSNTrainer`` does differently when the model is sharded (FSDP, DeepSpeed).

Under DDP every process holds the whole model and the rank log-variances (which live outside the model, in
:class:`~nsn_peft.training.UncertaintyWeightedLoss`) simply join the Trainer's optimizer as one more
parameter group. A sharded run cannot do that:

* Accelerate's FSDP2 preparation swaps every optimizer parameter for its sharded model parameter, looked up
  by name, and raises ``KeyError`` for a parameter that is not in the model; FSDP optimizer-state
  checkpointing (``torch.distributed.checkpoint``) does the same; DeepSpeed flattens and partitions every
  parameter its optimizer holds.
* Saving the adapter: the trainable factors are shards (``DTensor`` under FSDP2), so a plain
  ``state_dict()`` is not the adapter.

So in a sharded run the log-variances get an optimizer of their own, :class:`LogVarOptimizer` (AdamW, the
Trainer's betas and epsilon, no weight decay), stepped right after the Trainer's optimizer with the learning
rate scaled by the same schedule; its state travels in the multi-rank checkpoint files. Their gradients are
averaged across processes before each step, as under DDP. The adapter is gathered to full tensors on save
(:func:`full_trainable_state_dict`, a collective call) and written in the ordinary single-file PEFT layout.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch
from accelerate.utils import DistributedType
from torch import nn

from ..naming import strip_wrapper_names
from ..tuner.ranks import nsn_layers
from ..tuner.runtime import set_runtime_options

logger = logging.getLogger(__name__)

__all__ = [
    "LogVarOptimizer",
    "accumulate_without_sync",
    "broadcast_trainable_parameters",
    "canonical_parameter_name",
    "check_supported_sharding",
    "contiguous_factors",
    "deepspeed_resume_directory",
    "end_distributed",
    "full_trainable_state_dict",
    "gathered_adapter_state",
    "prepare_sharded_training",
    "save_fsdp2_adapter",
    "save_trained_adapter",
    "schedule_factor",
    "sharding_name",
    "use_precise_fsdp2_mixed_precision",
]


def sharding_name(trainer: Any) -> Optional[str]:
    """``"fsdp2"``, ``"fsdp1"``, ``"deepspeed"`` or ``None`` (not sharded: single process, DDP)."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "deepspeed"
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        return "fsdp2" if getattr(plugin, "fsdp_version", 1) == 2 else "fsdp1"
    return None


def check_supported_sharding(trainer: Any) -> None:
    """Refuse sharding setups ``NSNTrainer`` has not been verified with, naming what to use instead."""
    if sharding_name(trainer) == "fsdp1":
        raise ValueError(
            "NSNTrainer supports FSDP through FSDP2 only (fully_shard, per-parameter DTensor shards): set "
            "fsdp_version: 2 in the Accelerate config, or fsdp_config={'version': 2} in TrainingArguments. FSDP1 "
            "(flat parameters) is deprecated in PyTorch and Accelerate and is not verified with rank slicing."
        )


def use_precise_fsdp2_mixed_precision(trainer: Any) -> bool:
    """Under FSDP2 mixed precision, reduce gradients in float32 and leave the model outputs uncast.

    Accelerate's default FSDP2 policy for ``bf16``/``fp16`` casts the parameters, the gradient reduction *and* the
    root module's outputs to the low-precision dtype. For multi-rank training that costs accuracy twice: the
    gradients of all the rank passes of a step accumulate in bf16 before the reduce-scatter, and the loss the
    model returns is rounded to bf16 (a relative error up to 2⁻⁹, which then feeds the uncertainty weights).
    Replaced by ``MixedPrecisionPolicy(param_dtype=<bf16/fp16>, reduce_dtype=float32, output_dtype=None)`` —
    compute stays in low precision, as with autocast on one GPU. Only Accelerate's default (all three the same
    low-precision dtype) is replaced; any other policy is left as configured. Returns whether it was replaced.
    """
    if sharding_name(trainer) != "fsdp2":
        return False
    plugin = trainer.accelerator.state.fsdp_plugin
    policy = getattr(plugin, "mixed_precision_policy", None)
    low = (torch.bfloat16, torch.float16)
    if policy is None or getattr(policy, "param_dtype", None) not in low:
        return False
    if not (policy.reduce_dtype == policy.param_dtype and getattr(policy, "output_dtype", None) == policy.param_dtype):
        return False
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=policy.param_dtype,
        reduce_dtype=torch.float32,
        output_dtype=None,
        cast_forward_inputs=getattr(policy, "cast_forward_inputs", True),
    )
    logger.info(
        "FSDP2 mixed precision: compute in %s, gradient reduction in float32, outputs uncast (NSNTrainer's choice "
        "instead of Accelerate's all-%s policy)",
        policy.param_dtype,
        policy.param_dtype,
    )
    return True


@torch.no_grad()
def broadcast_trainable_parameters(model: nn.Module, src: int = 0) -> bool:
    """Copy process ``src``'s trainable parameters to every process; ``True`` if any process held other values.

    DDP does this when it wraps a model; FSDP2 does not — each process keeps its own copy of the rows it
    shards. The NSN factors come from an SVD run in every process, and an SVD is unique only up to the sign of
    each singular pair: should two processes ever disagree, the gathered factors would mix rows of both and the
    model would be silently wrong. Collective: call on every process before the model is sharded.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or any(p.is_meta for p in params):
        # Nothing to compare, or Accelerate's cpu_ram_efficient_loading: only process 0 holds the weights and
        # Accelerate broadcasts them after sharding.
        return False
    on_gpu = torch.cuda.is_available() and "nccl" in str(dist.get_backend())
    backend_device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    differed = torch.zeros(1, device=backend_device)
    for param in params:
        mine = param.detach().to(backend_device)
        theirs = mine.clone()
        dist.broadcast(theirs, src=src)
        if not torch.equal(mine, theirs):
            differed += 1
            param.copy_(theirs.to(param.device))
    dist.all_reduce(differed)
    if differed.item() > 0:
        logger.warning(
            "The trainable parameters differed across processes before sharding (%d parameter tensors in all); "
            "every process now holds process %d's values",
            int(differed.item()),
            src,
        )
    return bool(differed.item() > 0)


def canonical_parameter_name(name: str) -> str:
    """``name`` without the pieces wrappers (activation checkpointing, compile, FSDP1) insert."""
    return strip_wrapper_names(name)


@torch.no_grad()
def full_trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of the model's trainable parameters, keyed by their unwrapped names.

    A collective call under FSDP2: every process must call it, in the same order, because each sharded
    parameter (``DTensor``) is all-gathered. Plain tensors (single process, DDP) are copied as they are.
    FSDP1 and DeepSpeed keep their own gathering (Trainer's ``save_model`` paths); they are not handled here.
    """
    from torch.distributed.tensor import DTensor

    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tensor = param.detach()
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        state[canonical_parameter_name(name)] = tensor.cpu().clone()
    return state


class LogVarOptimizer:
    """AdamW for the rank log-variances of a sharded run, stepped beside the Trainer's optimizer.

    It computes the same update as ``torch.optim.AdamW`` would as a parameter group of the Trainer's optimizer
    (the single-process/DDP arrangement): learning rate ``lr`` times the schedule factor of that step, the
    Trainer's ``adam_beta1``/``adam_beta2``/``adam_epsilon``, no weight decay.

    Args:
        log_vars: The log-variance parameter (float32, outside the model).
        lr: Base learning rate (``NSNTrainer(logvar_learning_rate=…)``).
        betas, eps: AdamW's moment decay rates and epsilon.
    """

    def __init__(
        self, log_vars: nn.Parameter, lr: float, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"LogVarOptimizer: lr must be >= 0, got {lr!r}")
        self.log_vars = log_vars
        self.base_lr = float(lr)
        self.optimizer = torch.optim.AdamW(
            [log_vars],
            lr=self.base_lr,
            betas=(float(betas[0]), float(betas[1])),
            eps=float(eps),
            weight_decay=0.0,
            foreach=False,
        )

    def step(self, schedule_factor: float = 1.0) -> None:
        """One AdamW step at ``lr · schedule_factor`` (a no-op without a gradient, like any optimizer)."""
        self.optimizer.param_groups[0]["lr"] = self.base_lr * float(schedule_factor)
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.log_vars.grad = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The AdamW state as named float32 CPU tensors (empty before the first step), for safetensors."""
        state = self.optimizer.state.get(self.log_vars, {})
        return {
            f"logvar_optimizer.{key}": torch.as_tensor(value).detach().float().cpu().reshape(-1).clone()
            for key, value in state.items()
            if key in ("step", "exp_avg", "exp_avg_sq")
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Restore what :meth:`state_tensors` wrote; ``False`` when ``tensors`` holds no optimizer state."""
        prefix = "logvar_optimizer."
        found = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not found:
            return False
        missing = {"step", "exp_avg", "exp_avg_sq"} - set(found)
        if missing:
            raise ValueError(f"log-variance optimizer state is missing {sorted(missing)}")
        shape = tuple(self.log_vars.shape)
        for key in ("exp_avg", "exp_avg_sq"):
            if tuple(found[key].shape) != shape:
                raise ValueError(
                    f"log-variance optimizer state '{key}' has shape {tuple(found[key].shape)}, expected {shape}"
                )
        device = self.log_vars.device
        self.optimizer.state[self.log_vars] = {
            "step": torch.tensor(float(found["step"].reshape(-1)[0]), dtype=torch.float32),
            "exp_avg": found["exp_avg"].to(device=device, dtype=self.log_vars.dtype).reshape(shape).clone(),
            "exp_avg_sq": found["exp_avg_sq"].to(device=device, dtype=self.log_vars.dtype).reshape(shape).clone(),
        }
        return True


def contiguous_factors(model: nn.Module) -> int:
    """Give every ``nsn_B`` stored rank-major for serving (factors-only loading, ``compile_for_ranks``) back its
    contiguous training layout (the model's ``rank_major`` runtime option off); returns how many layers were
    laid out rank-major.

    FSDP2 and ZeRO-3 shard flat views of contiguous parameters (they refuse others), and DDP's gradient
    buckets are laid out like the parameters. Outputs do not depend on the layout.
    """
    moved = sum(layer.rank_major_storage for layer in nsn_layers(model).values())
    set_runtime_options(model, rank_major=False)
    return moved


def prepare_sharded_training(trainer: Any, model: nn.Module) -> Optional[LogVarOptimizer]:
    """What ``NSNTrainer.__init__`` does for a sharded run; returns the log-variance optimizer (or ``None``).

    Refuses FSDP1, sets the FSDP2 mixed-precision policy (:func:`use_precise_fsdp2_mixed_precision`), makes
    every process start from the same factors (:func:`broadcast_trainable_parameters`), and gives learnable
    log-variances a :class:`LogVarOptimizer`. A no-op returning ``None`` for unsharded runs.
    """
    strategy = sharding_name(trainer)
    if strategy is None:
        return None
    check_supported_sharding(trainer)
    if strategy == "fsdp2":
        use_precise_fsdp2_mixed_precision(trainer)
        broadcast_trainable_parameters(model)
    rank_loss = trainer.rank_loss
    if not rank_loss.learnable:
        return None
    args = trainer.args
    if getattr(args, "fp16", False):
        # fp16 scales the loss; the sharded runs' log-variance optimizer sits outside the loss scaler that would
        # unscale its gradients and skip overflowing steps. bf16 needs no scaling.
        raise ValueError(
            "NSNTrainer(weighting='uncertainty') with fp16 is not supported under FSDP/DeepSpeed (the log-variances' "
            "gradients would stay loss-scaled); use bf16, or weighting='sum'."
        )
    return LogVarOptimizer(
        rank_loss.log_vars, trainer.logvar_learning_rate, (args.adam_beta1, args.adam_beta2), args.adam_epsilon
    )


@contextlib.contextmanager
def accumulate_without_sync(accelerator: Any, model: nn.Module) -> Iterator[None]:
    """Context for a backward pass whose gradients only accumulate (every rank pass of a step but the last).

    DDP and FSDP: ``accelerator.no_sync(model)``. DeepSpeed: Accelerate's ``backward`` also steps the optimizer
    whenever ``sync_gradients`` is set, so it is cleared for the pass (the engine then treats the pass as
    inside a gradient-accumulation window) and restored after.
    """
    if getattr(accelerator, "distributed_type", None) != DistributedType.DEEPSPEED:
        with accelerator.no_sync(model):
            yield
        return
    state = accelerator.gradient_state
    before = state.sync_gradients
    state._set_sync_gradients(False)
    try:
        yield
    finally:
        state._set_sync_gradients(before)


def deepspeed_resume_directory(trainer: Any, resume_from_checkpoint: Union[str, bool, None]) -> Optional[str]:
    """The checkpoint folder a DeepSpeed run resumes from (``None`` if it does not resume or is not DeepSpeed).

    ``Trainer`` resumes a DeepSpeed run through the engine alone, without ``_load_from_checkpoint``, so
    ``NSNTrainer.train`` restores the multi-rank state itself from this folder.
    """
    if not getattr(trainer, "is_deepspeed_enabled", False) or not resume_from_checkpoint:
        return None
    if isinstance(resume_from_checkpoint, bool):
        from transformers.trainer_utils import get_last_checkpoint

        found = get_last_checkpoint(trainer.args.output_dir)
        if found is None:
            raise ValueError(f"No valid checkpoint found in output directory ({trainer.args.output_dir})")
        return found
    return str(resume_from_checkpoint)


def schedule_factor(optimizer: Any, scheduler: Any, default_lr: float) -> float:
    """How far the LR schedule has scaled the first parameter group at this step (``lr_now / lr_base``).

    Read right after ``optimizer.step()``, before the scheduler steps: the factor the step just used. ``1.0``
    when it cannot be told (no optimizer, a base learning rate of 0).
    """
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return 1.0
    base_lrs = getattr(scheduler, "base_lrs", None)
    base = float(base_lrs[0]) if base_lrs else float(groups[0].get("initial_lr", default_lr))
    return float(groups[0]["lr"]) / base if base > 0 else 1.0


def save_fsdp2_adapter(trainer: Any, output_dir: str) -> None:
    """Write the adapter of an FSDP2 run in the ordinary single-file PEFT layout. Collective: call on every process.

    Gathers only the trainable parameters (the NSN factors), not the frozen base model, and lets the main
    process write them with ``PeftModel.save_pretrained`` (through ``Trainer._save``: adapter, config, tokenizer,
    training arguments).
    """
    state = full_trainable_state_dict(trainer.model_wrapped)
    trainer._save(output_dir, state_dict=state)


def gathered_adapter_state(trainer: Any) -> Optional[dict[str, torch.Tensor]]:
    """The full trainable state of a sharded run for ``save_pretrained(state_dict=…)`` (``None`` when unsharded).

    Collective under FSDP2 and DeepSpeed ZeRO-3: call on every process. DeepSpeed returns it on the main process
    only (``None`` elsewhere).
    """
    strategy = sharding_name(trainer)
    if strategy == "fsdp2":
        return full_trainable_state_dict(trainer.model_wrapped)
    engine = trainer.model_wrapped
    if strategy == "deepspeed" and getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
    return None


def save_trained_adapter(trainer: Any, directory: Union[str, os.PathLike], tokenizer: Any = None) -> None:
    """Write the trained adapter (ordinary PEFT layout, one ``adapter_model.safetensors``) to ``directory``.

    Works the same in one process, under DDP, FSDP2 and DeepSpeed: every process must call it (the sharded
    factors are gathered first); the main process writes, atomically (a complete folder or none); the others
    wait for it. ``tokenizer`` is saved beside the adapter when given.
    """
    from ..io import atomic_directory

    state = gathered_adapter_state(trainer)
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        with atomic_directory(directory) as tmp:
            model.save_pretrained(str(tmp), state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
    trainer.accelerator.wait_for_everyone()


def end_distributed() -> Optional[str]:
    """Wait for every process, then tear the process group down; returns its backend (``None`` without one).

    For scripts that own their processes (the ``nsn-peft`` command under ``torchrun``): a process group left to
    interpreter exit can abort the process with gloo.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    backend = str(dist.get_backend())
    dist.barrier()
    dist.destroy_process_group()
    return backend
