"""Compression of models larger than the device: statistics, allocation, initialisation and block-wise refinement,
one transformer block at a time on the device.

    model = AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.bfloat16, device_map="cpu")
    peft_model, report = compress_sequential(model, calibration_blocks, 0.6, device="cuda")
    peft_model.save_pretrained("nsn-60")

The passes over the blocks:

1. **Statistics** (bottom up): the calibration sequences go through the dense blocks; each block's input Grams
   are accumulated while it is on the device (:func:`~nsn_peft.sequential.statistics.forward_statistics`).
2. **Output gradients** (top down, mixed allocation only): the loss gradient is carried down block by block;
   each layer's loss-weighted spectrum is computed while its block is on the device
   (:func:`~nsn_peft.sequential.statistics.backward_statistics`), and only the spectra are kept.
3. **Allocation**: the greedy of :func:`~nsn_peft.allocate_ranks_for_budget` over all layers' spectra (or
   :func:`~nsn_peft.planning.uniform_plan`).
4. **Initialisation and block-wise refinement** (bottom up): each block's whitened factors are computed and
   trained against the dense block (:func:`~nsn_peft.refine.blockwise.refine_block`) on the inputs the
   compressed blocks below produce, which is exactly what :func:`~nsn_peft.refine.refine_blockwise` does on a
   model in memory.

On the device at any time: one block (dense weights, factors, optimizer state), the hidden states of the
calibration sequences (two streams in pass 4), and that block's statistics. The result equals
:func:`~nsn_peft.refine.compress_and_refine` with ``allocation="mixed"`` or ``"uniform"`` and no end-to-end stage.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate.stats import ActivationStats
from ..devices import resolve_device
from ..linalg.spectra import loss_weighted_spectrum
from ..planning.allocate import allocate_ranks_for_budget, uniform_plan
from ..planning.plan import RankPlan
from ..planning.targets import dense_weight
from ..refine._common import check_tokens
from ..refine.blockwise import refine_block
from ..refine.config import RefineConfig
from ..tuner.config import NSNConfig
from ..tuner.peft_type import checkpoint_load_scope
from .output import save_offloaded_adapter
from .placement import BlockPlacement, Materialize, format_bytes
from .statistics import (
    HiddenStore,
    StatsStore,
    activation_bytes,
    backward_statistics,
    decomposition_bytes,
    forward_statistics,
)
from .trajectory import BlockLayout, Trajectory, block_layout

logger = logging.getLogger(__name__)

__all__ = ["SequentialReport", "compress_sequential"]

SEQUENTIAL_ALLOCATIONS = ("mixed", "uniform")


@dataclass
class SequentialReport:
    """What :func:`compress_sequential` did: the plan, the block-wise errors, and time and memory per block.

    Attributes:
        seconds: per pass (``statistics``, ``gradients``, ``allocation``, ``refine``) and ``total``.
        block_seconds: per pass, the seconds of each block (bottom to top); ``spectra`` and ``init``: the parts of
            the ``gradients`` and ``refine`` passes spent on decompositions.
        peak_device_bytes: per pass, the peak memory allocated on the device while each block was on it (CUDA):
            ``max`` over a pass's list is that pass's peak, ``max`` over all passes the run's.
        estimated_bytes: per pass, the estimate checked before the block that needed the most (``weights``,
            ``statistics``, ``activations``, ``decomposition`` / ``initialisation``, ``factors and optimizer
            state``): upper bounds on what one block's work holds, to read beside the measured peaks.
        peak_rss_bytes: the process's peak resident memory at the end of each pass.
        error_before / error_after: per block, the block-wise refinement's relative output error (see
            :class:`~nsn_peft.refine.BlockwiseResult`).
    """

    fraction: float
    allocation: str
    device: str
    blocks: int
    ranks: dict[str, int] = field(default_factory=dict)
    kept_dense: list[str] = field(default_factory=list)
    achieved: float = 0.0
    calibration_tokens: int = 0
    gradient_tokens: int = 0
    blockwise_tokens: int = 0
    blockwise_steps: int = 0
    error_before: list[float] = field(default_factory=list)
    error_after: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    block_seconds: dict[str, list[float]] = field(default_factory=dict)
    peak_device_bytes: dict[str, list[int]] = field(default_factory=dict)
    estimated_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    peak_rss_bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Meter:
    """Seconds and peak device memory of each block of a pass."""

    def __init__(self, report: SequentialReport, phase: str, placement: BlockPlacement) -> None:
        self.report, self.phase, self.placement, self.device = report, phase, placement, placement.device
        report.block_seconds[phase], report.peak_device_bytes[phase] = [], []
        self.started = self.last = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def block_done(self) -> None:
        need, largest = self.placement.last_need, self.report.estimated_bytes.get(self.phase)
        if need and (largest is None or sum(need.values()) > sum(largest.values())):
            self.report.estimated_bytes[self.phase] = {k: int(v) for k, v in need.items() if v}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.report.peak_device_bytes[self.phase].append(int(torch.cuda.max_memory_allocated(self.device)))
        now = time.perf_counter()
        self.report.block_seconds[self.phase].append(round(now - self.last, 3))
        peaks = self.report.peak_device_bytes[self.phase]
        logger.info(
            "%s, block %d of the pass: %.2f s%s",
            self.phase,
            len(self.report.block_seconds[self.phase]),
            now - self.last,
            f", peak {format_bytes(peaks[-1])}" if peaks else "",
        )
        self.last = now
        self._reset()

    def done(self) -> None:
        self.report.seconds[self.phase] = round(time.perf_counter() - self.started, 3)
        self.report.peak_rss_bytes[self.phase] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _block_spectra(layout: BlockLayout, store: StatsStore, spectra: dict, damp: float, meter: _Meter):
    seconds = meter.report.block_seconds.setdefault("spectra", [])

    def on_block(index: int, block: nn.Module, gradient_stats: ActivationStats) -> None:
        t = time.perf_counter()
        stats = store.get(index)  # CPU: each layer's Gram goes to the device on its own, inside the decomposition
        for name, module in layout.targets[index].items():
            weight = dense_weight(module).detach()
            # The layer's gradient Gram leaves the block's statistics (normalised in place): memory shrinks
            # layer by layer instead of holding every Gram until the block is done.
            grad = gradient_stats.grams.pop(name).div_(max(gradient_stats.token_counts[name], 1))
            spectra[name] = loss_weighted_spectrum(weight, stats.gram(name), grad, damp).cpu()
            del grad
        seconds.insert(0, round(time.perf_counter() - t, 3))
        meter.block_done()

    return on_block


def _factor_bytes(layout: BlockLayout, index: int, plan: RankPlan, element: int) -> int:
    return sum(plan.ranks[n] * sum(plan.shapes[n]) * element for n in layout.targets[index] if n in plan.ranks)


def _init_bytes(layout: BlockLayout, index: int, plan: RankPlan) -> int:
    """Temporaries of one layer's whitened factors, the block's largest: see :func:`decomposition_bytes`."""
    return decomposition_bytes(plan.shapes[n] for n in layout.targets[index] if n in plan.ranks)


def compress_sequential(
    model: nn.Module,
    calibration: torch.Tensor,
    fraction: float,
    *,
    target_modules: Union[None, str, list[str]] = None,
    allocation: str = "mixed",
    config: Optional[RefineConfig] = None,
    granularity: int = 1,
    stats: Optional[ActivationStats] = None,
    device: Optional[Union[str, torch.device]] = None,
    materialize: Optional[Materialize] = None,
    offload_folder: Optional[Union[str, os.PathLike]] = None,
    max_memory: Optional[Union[int, str]] = None,
    stats_dtype: torch.dtype = torch.float64,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    show_progress: bool = True,
) -> tuple[nn.Module, SequentialReport]:
    """Compress the targeted layers of a dense model to ``fraction`` of their parameters, one block on the device
    at a time, and refine each block's factors against the dense block.

    Args:
        model: the dense model, anywhere: on the CPU, loaded with accelerate's offloading (``device_map`` with
            ``"cpu"``/``"disk"`` entries and ``offload_folder``), or on the ``meta`` device with ``materialize``.
            Its weights are never written; it becomes the returned ``PeftModel``'s base.
        calibration: ``(sequences, seq_len)`` token ids, used as :func:`~nsn_peft.refine.compress_and_refine`
            uses its training part (statistics over all of them, output gradients over
            ``config.gradient_tokens``, block-wise refinement over ``config.blockwise_tokens``).
        fraction: kept share of the targeted layers' parameters, in (0, 1).
        target_modules: layers to factor (names, regex, or ``None``/``"all-linear"``); all inside the blocks.
        allocation: ``"mixed"`` (loss-weighted per-layer ranks, needs the output-gradient pass) or ``"uniform"``.
        config: the refinement settings (batch size, block-wise epochs / learning rate / tokens, precision, seed);
            the end-to-end and validation settings do not apply.
        granularity: ranks are multiples of this.
        stats: precomputed activation statistics (skips their accumulation).
        device: where blocks are processed (default: CUDA if available).
        materialize: ``(name, meta_tensor, device) -> tensor`` for weights on ``meta`` without an accelerate hook.
        offload_folder: keeps the statistics, the block inputs of the gradient pass and the factors of finished
            blocks on disk instead of in CPU memory during the run (the factors are read back at the end).
        max_memory: the most the run may hold on ``device`` (e.g. ``"20GiB"``); default: what is free.
        stats_dtype: dtype the statistics are accumulated in on the device and kept in between passes (float64:
            exact sums over any number of tokens; float32 halves their memory on the device and on disk, at a
            relative rounding of about ``batches × 6e-8`` on the sums).
        output_dir: the adapter is saved there (``PeftModel.save_pretrained``'s layout). With ``offload_folder`` it
            is written from the factor files one block at a time, and the returned model's factors stay on
            disk (``meta``): load the adapter from ``output_dir`` to use it.

    Returns:
        ``(peft_model, report)``: the model with NSN layers at the plan's ranks (factors on the CPU; the dense
        weights where they were) and a :class:`SequentialReport`.

    Raises:
        BlockDoesNotFitError: a block and what its processing needs exceed the device's memory (the error names
            the block and the bytes).
    """
    from accelerate import init_empty_weights
    from peft import get_peft_model

    config = config or RefineConfig()
    if allocation not in SEQUENTIAL_ALLOCATIONS:
        raise ValueError(
            f"allocation must be one of {SEQUENTIAL_ALLOCATIONS} for sequential compression, got {allocation!r} "
            "(the validation-based choice needs the whole model: compress_and_refine)"
        )
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    train = check_tokens(calibration)
    started = time.perf_counter()
    run_device = torch.device(resolve_device(device))
    layout = block_layout(model, target_modules)
    placement = BlockPlacement(
        model,
        layout.blocks,
        run_device,
        materialize=materialize,
        max_memory=max_memory,
        offload_folder=os.path.join(offload_folder, "factors") if offload_folder else None,
    )
    store = StatsStore(os.path.join(offload_folder, "stats") if offload_folder else None, stats_dtype)
    bs, seq_len = config.batch_size, train.shape[1]
    dtype = model.get_input_embeddings().weight.dtype
    report = SequentialReport(
        fraction=fraction,
        allocation=allocation,
        device=str(run_device),
        blocks=len(layout.blocks),
        calibration_tokens=int(train.numel()),
    )
    was_training = model.training
    model.eval()
    try:
        gradient_tokens = (
            train if config.gradient_tokens is None else train[: max(1, config.gradient_tokens // seq_len)]
        )
        mixed = allocation == "mixed"
        if stats is not None:
            for index, targets in enumerate(layout.targets):
                store.put(
                    index,
                    ActivationStats({n: stats.grams[n] for n in targets}, {n: stats.token_counts[n] for n in targets}),
                )
        inputs = HiddenStore(os.path.join(offload_folder, "hidden") if offload_folder else None)
        if stats is None or mixed:
            meter = _Meter(report, "statistics", placement)
            trajectory = Trajectory(placement, layout, train, bs, dtype)
            forward_statistics(
                placement,
                layout,
                trajectory,
                store=store if stats is None else None,
                dtype=stats_dtype,
                keep_inputs=gradient_tokens.shape[0] if mixed else 0,
                kept=inputs,
                on_block=lambda i, b: meter.block_done(),
                show_progress=show_progress,
            )
            del trajectory
            meter.done()
        t = time.perf_counter()
        if mixed:
            meter = _Meter(report, "gradients", placement)
            calls = Trajectory(placement, layout, gradient_tokens, max(1, bs // 2), dtype).calls
            spectra: dict[str, torch.Tensor] = {}
            report.gradient_tokens = backward_statistics(
                placement,
                layout,
                gradient_tokens,
                inputs,
                calls,
                batch_size=max(1, bs // 2),
                dtype=stats_dtype,
                on_block=_block_spectra(layout, store, spectra, 1e-6, meter),
                show_progress=show_progress,
            )
            inputs.clear()
            meter.report.block_seconds["gradients"].reverse()
            meter.report.peak_device_bytes["gradients"].reverse()
            meter.done()
            t = time.perf_counter()
            plan = allocate_ranks_for_budget(
                model,
                None,
                fraction,
                target_modules=target_modules,
                granularity=granularity,
                spectra=spectra,
                normalize="none",
                show_progress=show_progress,
            )
            plan.target["weighting"] = "output_gradient"
        else:
            plan = uniform_plan(model, fraction, target_modules=target_modules, granularity=granularity)
        report.seconds["allocation"] = round(time.perf_counter() - t, 3)
        report.ranks, report.kept_dense = dict(plan.ranks), list(plan.kept_dense)
        report.achieved = float(plan.target.get("achieved", plan.parameter_fraction()))

        nsn_config = NSNConfig(
            target_modules=sorted(plan.ranks),
            init="whitened",
            rank_pattern={re.escape(n): r for n, r in plan.ranks.items()},
        )
        # The factors are made block by block below, as a checkpoint's would be read: none now, none allocated.
        with checkpoint_load_scope(), init_empty_weights(include_buffers=False):
            peft_model = get_peft_model(model, nsn_config)
        peft_model.eval()
        _refine(peft_model, placement, layout, plan, store, train, config, dtype, report, show_progress)
        if output_dir is not None and placement.stored:
            save_offloaded_adapter(peft_model, placement, output_dir)  # one block's factors in memory at a time
        else:
            placement.load_stored()  # the factors kept on disk come back into CPU memory
            if output_dir is not None:
                peft_model.save_pretrained(output_dir)
    finally:
        placement.close()
        model.train(was_training)
    report.seconds["total"] = round(time.perf_counter() - started, 3)
    return peft_model, report


def _refine(
    peft_model,
    placement: BlockPlacement,
    layout: BlockLayout,
    plan: RankPlan,
    store: StatsStore,
    train: torch.Tensor,
    config: RefineConfig,
    dtype: torch.dtype,
    report: SequentialReport,
    show_progress: bool,
) -> None:
    """Pass 4: each block's whitened factors, then its block-wise refinement, bottom to top."""
    bs, seq_len = config.batch_size, train.shape[1]
    tokens = train if config.blockwise_tokens is None else train[: max(bs, config.blockwise_tokens // seq_len)]
    n = tokens.shape[0] // bs * bs
    if n == 0:
        raise ValueError(
            f"Block-wise refinement needs at least batch_size={bs} calibration sequences, got {tokens.shape[0]}"
        )
    tokens = tokens[:n]
    report.blockwise_tokens = int(tokens.numel())
    tuner = peft_model.base_model
    adapter_config = peft_model.peft_config[peft_model.active_adapter]
    meter = _Meter(report, "refine", placement)
    init_seconds = report.block_seconds.setdefault("init", [])
    trajectory = Trajectory(placement, layout, tokens, bs, dtype)
    dense_h, student_h = trajectory.hidden, trajectory.hidden.clone()
    call = trajectory.calls[bs]
    generator = torch.Generator().manual_seed(config.seed)
    element = torch.empty(0, dtype=dtype).element_size()
    for index in tqdm(
        range(len(layout.blocks)), desc="Compressing block by block", unit="block", disable=not show_progress
    ):
        names = [n for n in layout.targets[index] if n in plan.ranks]
        factors = _factor_bytes(layout, index, plan, element)
        extra = {
            "factors and optimizer state": 4 * factors,
            "initialisation": _init_bytes(layout, index, plan),
            "activations": activation_bytes(layout.targets[index], bs * seq_len, 4, backward=True),
        }
        with placement.visit(index, sum(extra.values()), extra) as block:
            t = time.perf_counter()
            if names:
                adapter_config.stats = store.get(index)  # CPU: one layer's Gram at a time goes to the device
                tuner.initialize_factors(names)
                adapter_config.stats = None
            init_seconds.append(round(time.perf_counter() - t, 3))
            before, after, steps = refine_block(
                block,
                call,
                dense_h,
                student_h,
                epochs=config.blockwise_epochs,
                lr=config.blockwise_lr,
                batch_size=bs,
                precision=config.precision,
                generator=generator,
            )
        report.error_before.append(before)
        report.error_after.append(after)
        report.blockwise_steps += steps
        meter.block_done()
        if names and config.blockwise_epochs:
            logger.info("block %d: relative error %.4g -> %.4g", index, before, after)
    meter.done()
    del dense_h, student_h, trajectory
