"""Triton path for the nested factored forward ``y = (x·A[:r]ᵀ)·B[:, :r]ᵀ + bias`` at decode-size token counts.

Why a kernel: at 1–64 tokens the first product ``x·A_rᵀ`` reduces over ``d`` (thousands) into an ``n×r`` output
that is a handful of tiles, so a library GEMM runs on a few multiprocessors and far below memory bandwidth. Both
products are memory-bound (the floor is reading ``r·(d+m)`` weight elements once), so the kernel's job is to keep
every multiprocessor streaming weights.

Scheme (default, two launches):

1. split-K for ``h = x·A_rᵀ``: each program reduces a ``BLOCK_R``-row tile of A over one chunk of ``d`` (the split
   is sized so that there are about ``waves`` programs per multiprocessor) and writes an fp32 partial; the last of a
   tile's programs to arrive (an arrival counter) sums the partials and writes that tile of ``h``, in x's dtype as
   the two-GEMM reference rounds it.
2. ``y = h·B_rᵀ + bias``, ``BLOCK_M`` output features per program.

Each loop streams its weight tiles through shared memory with cp.async, a few tiles in flight per program; a single
token is a GEMV on the CUDA cores, 2–64 tokens use tensor-core dots over 16 or 64 token rows.
The arrival counters reset themselves (the last arrival zeroes its counter), so the small int32 buffer holding
them is zero at every launch without a memset: one per (device, stream), reused, also inside CUDA graphs.

A one-launch variant (``fused=True``) runs both products in one grid: each program takes its role from an atomic
ticket rather than its program id, so a second-product program only waits (for a count of finished tiles of h) on
programs that have already started, whatever order the hardware starts blocks in (the dynamic tile ordering of
decoupled look-back scans); the last program to finish resets the counters. It is correct and tested but measured
slower on an H100 than two launches inside a CUDA graph (benchmarks/notes_kernels.md), so it is off by default.

Rows past the rank, the token count or the output size are clamped to the last valid row, computed and dropped at
the store, so every full tile is an unmasked vector load; only the ragged end of ``d`` or of the rank goes through a
masked tail.

Importing this module never fails without Triton: ``TRITON_AVAILABLE`` is then False and nothing is registered.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional, GPU-only dependency (CI has none)
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None

__all__ = ["TRITON_AVAILABLE", "KernelConfig", "choose_config", "nested_linear_triton"]


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch shape of one call (see ``choose_config``)."""

    block_n: int  # token rows per tile; 1 = a GEMV on the CUDA cores (no padding of the token dimension to 16)
    block_r: int  # rank rows of A per first-product tile
    block_k: int  # columns of d per first-product step
    block_m: int  # output features per second-product tile
    block_k2: int  # rank columns per second-product step
    num_warps: int = 4
    num_stages: int = 4  # pipeline depth of the first product's loop (tiles in flight + 1)
    stages2: int = 4  # and of the second product's
    waves: float = 2.0  # first-product programs ~ waves x multiprocessors (sets the split of d)
    fused: bool = False  # one launch (ticket-ordered roles) or two; two measured faster on an H100


def choose_config(n: int, d: int, m: int, rank: int, dtype: torch.dtype) -> KernelConfig:
    """Tile sizes by token-count bucket; nothing here depends on the rank, so switching it compiles nothing new.

    Each pipeline stage holds about 8 KiB of weights per program, with 2-3 stages in flight: enough bytes per
    multiprocessor to cover memory latency at two or more resident programs each, small enough that the split of
    ``d`` still gives every multiprocessor work at low ranks. These were the best of the candidates timed on an
    H100 (benchmarks/notes_kernels.md).
    """
    wide = 2 if dtype == torch.float32 else 1  # fp32 tiles hold half the elements for the same bytes
    if n == 1:
        return KernelConfig(block_n=1, block_r=16, block_k=256 // wide, block_m=16, block_k2=256 // wide)
    if n <= 16:
        return KernelConfig(block_n=16, block_r=32, block_k=128 // wide, block_m=16, block_k2=256 // wide)
    # 17-64 tokens: one bucket (each bucket is another compiled variant); 64-row fp32 accumulators per phase
    # fit in registers only with 64-wide steps (128 spills, per the compiler's resource report)
    return KernelConfig(
        block_n=64, block_r=64, block_k=64 // wide, block_m=32, block_k2=64 // wide, num_stages=3, stages2=3
    )


if TRITON_AVAILABLE:

    @triton.jit
    def _rows_dot(
        lhs,
        rhs,
        rhs_col_stride,
        k_lo,
        k_end,
        k_hi,
        BLOCK_N: tl.constexpr,
        BLOCK_O: tl.constexpr,
        BLOCK_K: tl.constexpr,
        STAGES: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """fp32 ``[BLOCK_N, BLOCK_O]`` = Σ_k lhs[:, k]·rhs[:, k] over ``k`` in ``[k_lo, k_hi)``.

        ``lhs`` holds row pointers ``[BLOCK_N, 1]`` (a scalar pointer when BLOCK_N == 1) with unit column stride,
        ``rhs`` row pointers ``[BLOCK_O, 1]``. Whole tiles run up to ``k_end`` unmasked; ``k_hi > k_end`` means a
        ragged tail, masked. BLOCK_N == 1 is a GEMV on the CUDA cores. The explicit ``tl.range(num_stages=...)``
        matters there: with it Triton streams the tiles through shared memory with cp.async, STAGES - 1 tiles in
        flight per program at ~50 registers; without it a load that feeds no tl.dot is not pipelined at all.
        """
        offs_k = tl.arange(0, BLOCK_K)
        if BLOCK_N == 1:
            acc = tl.zeros([BLOCK_O], dtype=tl.float32)
            for k in tl.range(k_lo, k_end, BLOCK_K, num_stages=STAGES):
                r_t = tl.load(rhs + (k + offs_k)[None, :] * rhs_col_stride)
                l_t = tl.load(lhs + k + offs_k)
                acc += tl.sum(r_t.to(tl.float32) * l_t.to(tl.float32)[None, :], axis=1)
            if k_hi > k_end:
                kk = k_end + offs_k
                r_t = tl.load(rhs + kk[None, :] * rhs_col_stride, mask=(kk < k_hi)[None, :], other=0.0)
                l_t = tl.load(lhs + kk, mask=kk < k_hi, other=0.0)
                acc += tl.sum(r_t.to(tl.float32) * l_t.to(tl.float32)[None, :], axis=1)
            out = acc[None, :]
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_O], dtype=tl.float32)
            for k in tl.range(k_lo, k_end, BLOCK_K, num_stages=STAGES):
                r_t = tl.load(rhs + (k + offs_k)[None, :] * rhs_col_stride)
                l_t = tl.load(lhs + (k + offs_k)[None, :])
                acc = tl.dot(l_t, tl.trans(r_t), acc, input_precision=PRECISION)
            if k_hi > k_end:
                kk = k_end + offs_k
                r_t = tl.load(rhs + kk[None, :] * rhs_col_stride, mask=(kk < k_hi)[None, :], other=0.0)
                l_t = tl.load(lhs + kk[None, :], mask=(kk < k_hi)[None, :], other=0.0)
                acc = tl.dot(l_t, tl.trans(r_t), acc, input_precision=PRECISION)
            out = acc
        return out

    @triton.jit
    def _phase1(
        pid,
        x_ptr,
        a_ptr,
        part_ptr,
        h_ptr,
        sync_ptr,
        n,
        d,
        rank,
        stride_xn,
        stride_ar,
        stride_hn,
        split_k,
        chunks_per_split,
        tiles,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        STAGES: tl.constexpr,
        PRECISION: tl.constexpr,
        FUSED: tl.constexpr,
    ):
        """One (tile, split) of ``h = x·A_rᵀ``; the last split of a tile to arrive writes the tile of h."""
        tile = pid // split_k
        split = pid % split_k
        # k_lo as a product with BLOCK_K, so the compiler can prove every tile's columns start 16-byte aligned:
        # with a plain run-time offset it cannot, and falls back to 2-byte loads that are never pipelined.
        k_lo = split * chunks_per_split * BLOCK_K
        k_hi = tl.minimum(k_lo + chunks_per_split * BLOCK_K, d)
        offs_n = tl.arange(0, BLOCK_N)
        offs_r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        a_rows = a_ptr + tl.minimum(offs_r, rank - 1).to(tl.int64)[:, None] * stride_ar
        if BLOCK_N == 1:
            x_rows = x_ptr
        else:
            x_rows = x_ptr + tl.minimum(offs_n, n - 1)[:, None] * stride_xn
        k_end = tl.minimum(k_hi, (d // BLOCK_K) * BLOCK_K)
        acc = _rows_dot(x_rows, a_rows, 1, k_lo, k_end, k_hi, BLOCK_N, BLOCK_R, BLOCK_K, STAGES, PRECISION)
        n_mask = (offs_n < n)[:, None]
        # h's columns up to tiles*BLOCK_R exist; the ones past the rank hold clamped rows and are never read.
        h_ptrs = h_ptr + offs_n[:, None] * stride_hn + offs_r[None, :]
        if split_k == 1:
            tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=n_mask)
            if FUSED:
                tl.debug_barrier()  # every thread's h stores precede the release below
                tl.atomic_add(sync_ptr + 1, 1, sem="release")
        else:
            part_cols = tiles * BLOCK_R
            part_ptrs = part_ptr + (split * n + offs_n)[:, None] * part_cols + offs_r[None, :]
            tl.store(part_ptrs, acc, mask=n_mask)
            tl.debug_barrier()
            arrived = tl.atomic_add(sync_ptr + 3 + tile, 1, sem="acq_rel")
            if arrived == split_k - 1:
                tl.debug_barrier()  # the acquire above (one thread) precedes every thread's loads below
                total = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
                tile_ptrs = part_ptr + offs_n[:, None] * part_cols + offs_r[None, :]
                for s in range(0, split_k):
                    # .cg: read at L2, where the other programs' stores are; never a stale L1 line
                    total += tl.load(tile_ptrs + s * n * part_cols, mask=n_mask, other=0.0, cache_modifier=".cg")
                tl.store(h_ptrs, total.to(h_ptr.dtype.element_ty), mask=n_mask)
                tl.atomic_xchg(sync_ptr + 3 + tile, 0, sem="relaxed")  # no one else touches it in this launch
                if FUSED:
                    tl.debug_barrier()
                    tl.atomic_add(sync_ptr + 1, 1, sem="release")

    @triton.jit
    def _phase2(
        pid,
        h_ptr,
        b_ptr,
        bias_ptr,
        y_ptr,
        n,
        m,
        rank,
        stride_hn,
        stride_bm,
        stride_br,
        stride_yn,
        has_bias,
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K2: tl.constexpr,
        STAGES: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """``BLOCK_M`` output features of ``y = h·B_rᵀ + bias``."""
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        b_rows = b_ptr + tl.minimum(offs_m, m - 1).to(tl.int64)[:, None] * stride_bm
        if BLOCK_N == 1:
            h_rows = h_ptr
        else:
            h_rows = h_ptr + tl.minimum(offs_n, n - 1)[:, None] * stride_hn
        # h needs no .cg: it is complete before any program reads it (two launches: the kernel boundary; one
        # launch: each reader's acquire of the finished count, which also invalidates L1), so no stale line.
        out = _rows_dot(
            h_rows,
            b_rows,
            stride_br,
            0,
            (rank // BLOCK_K2) * BLOCK_K2,
            rank,
            BLOCK_N,
            BLOCK_M,
            BLOCK_K2,
            STAGES,
            PRECISION,
        )
        if has_bias != 0:  # a run-time flag: one compiled variant less, and the branch is outside every loop
            out += tl.load(bias_ptr + tl.minimum(offs_m, m - 1)).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_n[:, None] * stride_yn + offs_m[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=(offs_n < n)[:, None] & (offs_m < m)[None, :])

    # Sizes that only bound loops or masks are not specialised (each specialisation is another compile); the row
    # strides are, since their alignment decides whether a row is read with 16-byte loads.
    @triton.jit(
        do_not_specialize=["n", "d", "m", "rank", "split_k", "chunks_per_split", "tiles", "num_first", "has_bias"]
    )
    def _nested_kernel(
        x_ptr,
        a_ptr,
        b_ptr,
        bias_ptr,
        y_ptr,
        part_ptr,
        h_ptr,
        sync_ptr,
        n,
        d,
        m,
        rank,
        stride_xn,
        stride_ar,
        stride_bm,
        stride_br,
        stride_hn,
        stride_yn,
        split_k,
        chunks_per_split,
        tiles,
        num_first,
        has_bias,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K2: tl.constexpr,
        STAGES1: tl.constexpr,
        STAGES2: tl.constexpr,
        PRECISION: tl.constexpr,
        ROLE: tl.constexpr,
        MAX_SPIN: tl.constexpr,
    ):
        """ROLE 0: both products in one launch (ticket-ordered roles); 1: first product only; 2: second only.

        sync_ptr (int32): [0] tickets, [1] finished tiles of h, [2] finished programs, [3 + t] arrivals at tile t.
        """
        if ROLE == 0:
            ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
            if ticket < num_first:
                _phase1(
                    ticket,
                    x_ptr,
                    a_ptr,
                    part_ptr,
                    h_ptr,
                    sync_ptr,
                    n,
                    d,
                    rank,
                    stride_xn,
                    stride_ar,
                    stride_hn,
                    split_k,
                    chunks_per_split,
                    tiles,
                    BLOCK_N,
                    BLOCK_R,
                    BLOCK_K,
                    STAGES1,
                    PRECISION,
                    True,
                )
            else:
                # Every program with a smaller ticket has started, so this wait always ends; MAX_SPIN only turns
                # a broken counter into a wrong result the tests catch instead of a hung GPU. The poll is a plain
                # volatile load; one acquire afterwards orders the reads of h. (Every thread of the program polls:
                # a suspect for this variant's extra cost, see benchmarks/notes_kernels.md.)
                done = tl.load(sync_ptr + 1, volatile=True)
                spins = 0
                while (done < tiles) & (spins < MAX_SPIN):
                    done = tl.load(sync_ptr + 1, volatile=True)
                    spins += 1
                tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
                tl.debug_barrier()
                _phase2(
                    ticket - num_first,
                    h_ptr,
                    b_ptr,
                    bias_ptr,
                    y_ptr,
                    n,
                    m,
                    rank,
                    stride_hn,
                    stride_bm,
                    stride_br,
                    stride_yn,
                    has_bias,
                    BLOCK_N,
                    BLOCK_M,
                    BLOCK_K2,
                    STAGES2,
                    PRECISION,
                )
            tl.debug_barrier()
            finished = tl.atomic_add(sync_ptr + 2, 1, sem="acq_rel")
            if finished == tl.num_programs(0) - 1:  # everyone is past every counter: reset for the next launch
                tl.atomic_xchg(sync_ptr, 0, sem="relaxed")
                tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed")
                tl.atomic_xchg(sync_ptr + 2, 0, sem="relaxed")
        elif ROLE == 1:
            _phase1(
                tl.program_id(0),
                x_ptr,
                a_ptr,
                part_ptr,
                h_ptr,
                sync_ptr,
                n,
                d,
                rank,
                stride_xn,
                stride_ar,
                stride_hn,
                split_k,
                chunks_per_split,
                tiles,
                BLOCK_N,
                BLOCK_R,
                BLOCK_K,
                STAGES1,
                PRECISION,
                False,
            )
        else:
            _phase2(
                tl.program_id(0),
                h_ptr,
                b_ptr,
                bias_ptr,
                y_ptr,
                n,
                m,
                rank,
                stride_hn,
                stride_bm,
                stride_br,
                stride_yn,
                has_bias,
                BLOCK_N,
                BLOCK_M,
                BLOCK_K2,
                STAGES2,
                PRECISION,
            )


# -- synchronisation buffer -------------------------------------------------------------------------------------

_SYNC_INTS = 3 + 4096  # counters + one arrival counter per first-product tile (rank / block_r <= 4096)
_SYNC: dict[tuple[int, int], torch.Tensor] = {}
_SYNC_LOCK = threading.Lock()
_SM_COUNT: dict[int, int] = {}
_MAX_SPIN = 1 << 26


def _zeros_outside_pools(device: torch.device) -> torch.Tensor:
    """A zeroed int32 buffer from the default allocator pool, made on a helper thread and stream.

    The cached buffer must outlive any CUDA-graph memory pool: torch.compile's CUDA-graph trees route the
    allocations of their warm-up runs (on the calling thread and stream) into a private pool whose allocator state
    they can rewind, which could hand this buffer's memory to another tensor. A fresh thread with its own stream
    is outside both filters.
    """
    out: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.cuda.device(device):
                stream = torch.cuda.Stream(device)
                with torch.cuda.stream(stream):
                    buf = torch.zeros(_SYNC_INTS, dtype=torch.int32, device=device)
                stream.synchronize()
                out.append(buf)
        except BaseException as exc:  # re-raised on the calling thread
            errors.append(exc)

    thread = threading.Thread(target=work, name="nsn-peft-sync-alloc")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


def _sync_buffer(device: torch.device) -> torch.Tensor:
    """The zero-at-rest counters for a launch on the current stream of ``device``.

    One buffer per (device, stream): launches on one stream are ordered, so they never share counters at the same
    time. On the CPU (Triton's interpreter) a fresh buffer each call.
    """
    if device.type != "cuda":
        return torch.zeros(_SYNC_INTS, dtype=torch.int32, device=device)
    key = (
        device.index if device.index is not None else torch.cuda.current_device(),
        torch.cuda.current_stream(device).cuda_stream,
    )
    buf = _SYNC.get(key)
    if buf is not None:
        return buf
    if torch.cuda.is_current_stream_capturing():
        # First use on this stream is inside a capture: a zeroed buffer per call (its fill is captured too, so
        # every replay starts from zeros). Slower by one small fill; warm up on the capture stream to avoid it.
        return torch.zeros(_SYNC_INTS, dtype=torch.int32, device=device)
    with _SYNC_LOCK:
        buf = _SYNC.get(key)
        if buf is None:
            buf = _SYNC[key] = _zeros_outside_pools(device)
    return buf


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs per role are enough to exercise every code path
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# -- launcher ---------------------------------------------------------------------------------------------------

_PRECISION = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "tf32"}  # tf32 is ignored for 16-bit


def _split(d: int, tiles: int, cfg: KernelConfig, sms: int) -> tuple[int, int]:
    """(split, block_k chunks per split): enough first-product programs for ``cfg.waves`` x the multiprocessors."""
    chunks = triton.cdiv(d, cfg.block_k)
    want = max(1, min(chunks, triton.cdiv(int(cfg.waves * sms), tiles)))
    per_split = triton.cdiv(chunks, want)
    return triton.cdiv(chunks, per_split), per_split


def nested_linear_triton(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    rank: int,
    bias: Optional[torch.Tensor] = None,
    config: Optional[KernelConfig] = None,
    fused: Optional[bool] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``(x·A[:rank]ᵀ)·B[:, :rank]ᵀ + bias`` through the Triton kernel (no autograd; see the module docstring).

    ``x`` (..., d), ``a`` (R, d), ``b`` (m, R) with any strides, ``bias`` (m,) or None; x, a and b share one of
    fp16/bf16/fp32. ``config``/``fused`` override the defaults (for benchmarks and tests); ``out`` is a
    contiguous ``(tokens, m)`` buffer to write into (tests poison it first).
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("nested_linear_triton needs triton")
    d = x.shape[-1]
    m = b.shape[0]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if a.stride(-1) != 1:
        a = a.contiguous()
    n = x2.shape[0]
    if out is None:
        y = torch.empty((n, m), dtype=x.dtype, device=x.device)
    else:
        if out.shape != (n, m) or out.dtype != x.dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape ({n}, {m})")
        y = out
    if n == 0:
        return y.reshape(*x.shape[:-1], m)
    cfg = config or choose_config(n, d, m, rank, x.dtype)
    if fused is not None:
        cfg = replace(cfg, fused=fused)
    if cfg.block_n != 1 and n > cfg.block_n or cfg.block_n == 1 and n != 1:
        raise ValueError(f"config block_n={cfg.block_n} cannot hold {n} tokens")
    sms = _sm_count(x.device)
    tiles = triton.cdiv(rank, cfg.block_r)
    if 3 + tiles > _SYNC_INTS:
        raise ValueError(f"rank {rank} needs {tiles} tiles of {cfg.block_r}; at most {_SYNC_INTS - 3}")
    split_k, chunks_per_split = _split(d, tiles, cfg, sms)
    h_cols = tiles * cfg.block_r
    h = torch.empty((n, h_cols), dtype=x.dtype, device=x.device)
    part = torch.empty((split_k * n * h_cols,) if split_k > 1 else (1,), dtype=torch.float32, device=x.device)
    sync = _sync_buffer(x.device)
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else y  # never read when has_bias is 0
    num_first = tiles * split_k
    num_second = triton.cdiv(m, cfg.block_m)
    args = (
        x2,
        a,
        b,
        bias_arg,
        y,
        part,
        h,
        sync,
        n,
        d,
        m,
        rank,
        x2.stride(0),
        a.stride(0),
        b.stride(0),
        b.stride(1),
        h.stride(0),
        y.stride(0),
        split_k,
        chunks_per_split,
        tiles,
        num_first,
        int(has_bias),
    )
    meta = dict(
        BLOCK_N=cfg.block_n,
        BLOCK_R=cfg.block_r,
        BLOCK_K=cfg.block_k,
        BLOCK_M=cfg.block_m,
        BLOCK_K2=cfg.block_k2,
        STAGES1=cfg.num_stages,
        STAGES2=cfg.stages2,
        PRECISION=_PRECISION[x.dtype],
        MAX_SPIN=_MAX_SPIN,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if cfg.fused:
        _nested_kernel[(num_first + num_second,)](*args, ROLE=0, **meta)
    else:
        _nested_kernel[(num_first,)](*args, ROLE=1, **meta)
        _nested_kernel[(num_second,)](*args, ROLE=2, **meta)
    return y.reshape(*x.shape[:-1], m)


if TRITON_AVAILABLE:

    @torch.library.custom_op("nsn_peft::nested_linear", mutates_args=(), device_types="cuda")
    def nested_linear_op(
        x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int, bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The Triton path as one opaque op: torch.compile keeps it in the graph, and ``rank`` is an input
        (a SymInt once dynamic), so changing it re-specialises nothing inside the op."""
        return nested_linear_triton(x, a, b, rank, bias)

    @nested_linear_op.register_fake
    def _nested_linear_fake(
        x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int, bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], b.shape[0]))
