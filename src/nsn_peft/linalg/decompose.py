"""Nested factorisations ``W ≈ B @ A`` whose every prefix is an optimal low-rank model (pure functions).

All functions take a weight ``W`` of shape (out_features m, in_features d) and return ``(B, A)`` with
``B`` (m×R) and ``A`` (R×d) ordered by importance, so that ``B[:, :r] @ A[:r]`` is the best rank-r
approximation in the relevant norm for *every* r ≤ R:

* :func:`svd_factors` — Frobenius norm (Eckart–Young), computed from the eigendecomposition of the
  smaller Gram matrix, which is several times faster than a full SVD on GPUs and exact at full rank.
* :func:`whitened_factors` — the activation metric ``‖(W − W_r) Xᵀ‖`` given ``C = XᵀX``
  (truncation-aware, SVD-LLM style): the error of the layer's *outputs* on the calibration data.
* :func:`projected_factors` — the utilized-rank projection ``W' = P_T W P_S`` onto the input and
  output subspaces that hold a given share of the activation energy, then factored.

Singular values are split evenly (``√σ`` to each side, see :func:`balance_factors`): both factors then
have the same scale, which keeps gradients of A and B comparable when the nested model is finetuned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ProjectedFactors",
    "ProjectionBases",
    "balance_factors",
    "check_finite",
    "energy_rank",
    "projected_factors",
    "projected_weight",
    "projection_bases",
    "robust_eigh",
    "svd_factors",
    "symmetrized",
    "whitened_factors",
]


def check_finite(weight: torch.Tensor, name: str) -> None:
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).sum().item()
        raise ValueError(f"Cannot decompose '{name}': its weight contains {bad} NaN/Inf value(s).")


def _check_rank(rank: int | None, full: int) -> int:
    if rank is None:
        return full
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    return min(rank, full)


def balance_factors(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each component so column i of B and row i of A have equal norms (product unchanged)."""
    b_norm = b.norm(dim=0)
    a_norm = a.norm(dim=1)
    # A component that is zero on either side stays as is (scale 1) rather than dividing by zero.
    ok = (b_norm > 0) & (a_norm > 0)
    scale = torch.where(ok, (a_norm / torch.where(ok, b_norm, 1)).sqrt(), torch.ones_like(a_norm))
    return b * scale, a / scale[:, None]


def robust_eigh(matrix: torch.Tensor, *, values_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``torch.linalg.eigh`` (ascending) that does not give up on an ill-conditioned symmetric matrix.

    The GPU solvers (cuSOLVER's ``syevd``) can fail to converge on matrices with clustered or huge-range
    eigenvalues, e.g. the Gram products of random-weight models, which the CPU's LAPACK handles. On a failure
    (or non-finite results) this retries in float64, then on the CPU in float64, then on the CPU with a tiny
    diagonal shift (which moves every eigenvalue by the same amount and leaves the eigenvectors unchanged; it
    is subtracted back). Results come back on the input's device and dtype. Raises ``ValueError`` for a
    matrix with NaN/Inf entries, and ``torch.linalg.LinAlgError`` if every attempt fails.
    """

    def solve(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if values_only:
            values, vectors = torch.linalg.eigvalsh(m), None
        else:
            values, vectors = torch.linalg.eigh(m)
        if not torch.isfinite(values).all() or (vectors is not None and not torch.isfinite(vectors).all()):
            raise torch.linalg.LinAlgError("eigh returned non-finite values")
        return values, vectors

    try:
        return solve(matrix)
    except torch.linalg.LinAlgError as err:
        first = err
    if not torch.isfinite(matrix).all():
        bad = (~torch.isfinite(matrix)).sum().item()
        raise ValueError(f"Cannot take the eigendecomposition of a matrix with {bad} NaN/Inf value(s)") from first
    n = matrix.shape[-1]
    scale = float(matrix.diagonal().abs().max()) if n else 0.0
    attempts = []
    if matrix.dtype != torch.float64:
        attempts.append(("float64", lambda: matrix.double(), 0.0))
    if matrix.device.type != "cpu":
        attempts.append(("float64 on the CPU", lambda: matrix.double().cpu(), 0.0))
    shift = max(scale, torch.finfo(torch.float64).tiny) * n * torch.finfo(torch.float64).eps
    attempts.append(("float64 on the CPU with a diagonal shift", lambda: _shifted(matrix.double().cpu(), shift), shift))
    for how, make, offset in attempts:
        try:
            values, vectors = solve(make())
        except torch.linalg.LinAlgError:
            continue
        logger.warning(
            "eigh of a %d×%d %s matrix on %s failed (%s); solved in %s",
            n,
            n,
            str(matrix.dtype).removeprefix("torch."),
            matrix.device,
            first,
            how,
        )
        values = (values - offset).to(device=matrix.device, dtype=matrix.dtype)
        return values, None if vectors is None else vectors.to(device=matrix.device, dtype=matrix.dtype)
    raise first


def _shifted(matrix: torch.Tensor, shift: float) -> torch.Tensor:
    matrix.diagonal().add_(shift)
    return matrix


def _descending_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = robust_eigh(matrix)
    return values.flip(0).clamp_min(0), vectors.flip(1)


def symmetrized(
    gram: torch.Tensor, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None, strip: int = 1024
) -> torch.Tensor:
    """``(C + Cᵀ) / 2`` as a new ``dtype`` matrix on ``device``, with one strip of temporaries instead of two
    full copies (a 28,672-wide float64 Gram is 6.6 GB: the difference decides whether a 70B block fits).

    Equal bit for bit to ``(c + c.T) / 2`` of ``c = gram.to(dtype)``.
    """
    c = gram.to(device=device if device is not None else gram.device, dtype=dtype, copy=True)
    n = c.shape[0]
    for i in range(0, n, strip):
        # Rows i:i+strip right of the diagonal and the mirrored columns below it: no later strip reads them.
        mean = (c[i : i + strip, i:] + c[i:, i : i + strip].T) * 0.5
        c[i : i + strip, i:] = mean
        c[i:, i : i + strip] = mean.T
    return c


def svd_factors(
    weight: torch.Tensor, rank: int | None = None, compute_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frobenius-optimal nested factors of ``weight`` via the Gram matrix of its smaller side.

    With ``V`` the eigenvectors of ``WᵀW`` (d ≤ m), ``W V_r V_rᵀ`` is the truncated SVD of ``W``, so
    ``A = V_rᵀ`` and ``B = W V_r``; at full rank ``B A = W VVᵀ = W`` up to rounding, however small the
    trailing singular values are. The m ≤ d case is the mirror image with ``WWᵀ``.
    """
    out_features, in_features = weight.shape
    rank = _check_rank(rank, min(out_features, in_features))
    w = weight.to(compute_dtype)
    if in_features <= out_features:
        _, v = _descending_eigh(w.T @ w)
        v = v[:, :rank]
        b, a = w @ v, v.T.contiguous()
    else:
        _, u = _descending_eigh(w @ w.T)
        u = u[:, :rank]
        b, a = u, u.T @ w
    return balance_factors(b, a)


def damped_cholesky(gram: torch.Tensor, damp: float, overwrite: bool = False) -> torch.Tensor:
    """Cholesky factor of ``C + λI`` with λ relative to the mean diagonal; grows λ until it succeeds.

    ``overwrite=True`` adds the damping to ``gram``'s diagonal in place (no copy of a matrix that may take
    gigabytes; ``gram`` is garbage afterwards).
    """
    scale = gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    work = gram if overwrite else gram.clone()
    diagonal = work.diagonal()
    original = diagonal.clone()
    lam = damp
    for _ in range(8):
        torch.add(original, lam * scale, out=diagonal)
        factor, info = torch.linalg.cholesky_ex(work)
        if int(info) == 0:
            return factor
        del factor
        lam = max(lam * 10, 1e-8)
    raise ValueError("Activation Gram matrix is not positive definite even after damping; check the stats.")


def whitened_factors(
    weight: torch.Tensor,
    gram: torch.Tensor,
    rank: int | None = None,
    damp: float = 1e-6,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nested factors minimising the output error ``‖(W − B_r A_r) Xᵀ‖_F`` for every r.

    With ``C = XᵀX = LLᵀ`` the optimum is the truncated SVD of ``W L`` mapped back: ``W_r = U_r U_rᵀ W``
    where ``U`` are the eigenvectors of ``W C Wᵀ``. When m > d the m×m problem is replaced by the d×d
    one, ``M = LᵀWᵀWL = VΣ²Vᵀ``, giving ``B = W L V`` and ``A = Vᵀ L⁻¹``. fp64 by default: the Gram
    of activations is badly conditioned (massive outlier features) and fp32 loses the small directions.
    """
    out_features, in_features = weight.shape
    if gram.shape != (in_features, in_features):
        raise ValueError(f"Gram matrix shape {tuple(gram.shape)} does not match weight in_features {in_features}")
    rank = _check_rank(rank, min(out_features, in_features))
    w = weight.to(compute_dtype)
    # Peak memory: two d×d matrices (the symmetrised Gram, then its Cholesky factor) and a few m×d ones.
    chol = damped_cholesky(symmetrized(gram, compute_dtype, w.device), damp, overwrite=True)
    wl = w @ chol
    if out_features <= in_features:
        del chol
        _, u = _descending_eigh(wl @ wl.T)
        del wl
        u = u[:, :rank]
        b, a = u, u.T @ w
    else:
        _, v = _descending_eigh(wl.T @ wl)
        v = v[:, :rank]
        b = wl @ v
        del wl
        # A = Vᵀ L⁻¹ computed as the solution of Lᵀ Aᵀ = V (triangular, stable).
        a = torch.linalg.solve_triangular(chol.T, v, upper=True).T
    return balance_factors(b, a)


def energy_rank(eigenvalues: torch.Tensor, energy: float) -> int:
    """Smallest k whose top-k eigenvalues (sorted descending) hold at least ``energy`` of the total."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy threshold must be in (0, 1], got {energy}")
    total = eigenvalues.sum()
    if total <= 0:
        return 0
    if energy >= 1:
        # Full energy means every direction the data (numerically) reaches.
        tol = eigenvalues[0] * eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps
        return int((eigenvalues > tol).sum().item())
    cumulative = torch.cumsum(eigenvalues, 0) / total
    k = (
        int(
            torch.searchsorted(
                cumulative, torch.tensor(energy, dtype=cumulative.dtype, device=cumulative.device)
            ).item()
        )
        + 1
    )
    # Rounding can leave the last cumulative share a hair below an energy just under 1: never exceed n.
    return min(k, eigenvalues.numel())


@dataclass
class ProjectedFactors:
    b: torch.Tensor  # m × r
    a: torch.Tensor  # r × d
    input_rank: int  # k_S: dimension of the input subspace
    output_rank: int  # k_T: dimension of the output subspace
    utilized_rank: int  # rank of W' = P_T W P_S


@dataclass
class ProjectionBases:
    """The eigendecompositions behind :func:`projected_factors`, which do not depend on the energies.

    ``in_values``/``in_vectors``: of ``C = XᵀX`` (descending); ``out_values``/``out_vectors``: of the output
    Gram ``W C Wᵀ`` (descending, numerically zero directions dropped when m > d). Computing them once lets a
    search try many energies at the cost of one small SVD each.
    """

    in_values: torch.Tensor
    in_vectors: torch.Tensor
    out_values: torch.Tensor
    out_vectors: torch.Tensor

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.in_values, self.in_vectors, self.out_values, self.out_vectors)
        )


def projection_bases(
    weight: torch.Tensor, gram: torch.Tensor, compute_dtype: torch.dtype = torch.float64
) -> ProjectionBases:
    """Input and output bases of ``weight`` under the activation Gram ``gram`` (see :class:`ProjectionBases`)."""
    out_features, in_features = weight.shape
    if gram.shape != (in_features, in_features):
        raise ValueError(f"Gram matrix shape {tuple(gram.shape)} does not match weight in_features {in_features}")
    w = weight.to(compute_dtype)
    in_values, in_vectors = _descending_eigh(symmetrized(gram, compute_dtype, w.device))
    # Output Gram W C Wᵀ = (W C^½)(W C^½)ᵀ; its eigenvectors are the left singular vectors of W C^½.
    root = in_vectors * in_values.clamp_min(0).sqrt()
    wr = w @ root
    if out_features <= in_features:
        out_values, out_vectors = _descending_eigh(wr @ wr.T)
    else:
        values, v = _descending_eigh(wr.T @ wr)
        keep = values > values[0] * in_features * torch.finfo(values.dtype).eps if values[0] > 0 else values > 0
        sigma = values[keep].sqrt()
        out_values, out_vectors = values[keep], (wr @ v[:, keep]) / sigma
    return ProjectionBases(in_values, in_vectors, out_values, out_vectors)


def projected_factors(
    weight: torch.Tensor,
    gram: torch.Tensor,
    energy_input: float = 1.0,
    energy_output: float = 1.0,
    rank: int | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> ProjectedFactors:
    """Factor ``W' = P_T W P_S`` (utilized-rank projection) into nested factors.

    ``P_S`` spans the top eigenvectors of ``C = XᵀX`` holding ``energy_input`` of the input energy;
    ``P_T`` spans those of ``W C Wᵀ`` (the Gram of the outputs, obtained without storing outputs)
    holding ``energy_output``. ``W'`` has rank ≤ min(k_S, k_T); its SVD orders the components.
    """
    bases = projection_bases(weight, gram, compute_dtype)
    w = weight.to(device=bases.in_vectors.device, dtype=bases.in_vectors.dtype)
    k_s = max(1, energy_rank(bases.in_values, energy_input))
    v_s = bases.in_vectors[:, :k_s]
    out_values = bases.out_values
    k_t = max(1, energy_rank(out_values, energy_output)) if out_values.numel() else 1
    u_t = bases.out_vectors[:, :k_t]
    core = u_t.T @ w @ v_s
    uc, sc, vch = torch.linalg.svd(core, full_matrices=False)
    tol = (sc[0] * max(core.shape) * torch.finfo(sc.dtype).eps) if sc.numel() else 0
    utilized = max(1, int((sc > tol).sum().item()))
    r = utilized if rank is None else max(1, min(rank, utilized))
    root_s = sc[:r].sqrt()
    b = (u_t @ uc[:, :r]) * root_s
    a = root_s[:, None] * (vch[:r] @ v_s.T)
    return ProjectedFactors(b=b, a=a, input_rank=k_s, output_rank=k_t, utilized_rank=utilized)


def projected_weight(
    bases: ProjectionBases, weight: torch.Tensor, energy_input: float, energy_output: float
) -> tuple[torch.Tensor, int]:
    """``(W' = P_T W P_S, its utilized rank)`` from precomputed bases, without factoring: what a search needs
    to try an energy.

    Equals ``b @ a`` of :func:`projected_factors` at the utilized rank (it drops only numerically zero singular
    values), for singular values only instead of a full SVD.
    """
    w = weight.to(device=bases.in_vectors.device, dtype=bases.in_vectors.dtype)
    v_s = bases.in_vectors[:, : max(1, energy_rank(bases.in_values, energy_input))]
    k_t = max(1, energy_rank(bases.out_values, energy_output)) if bases.out_values.numel() else 1
    u_t = bases.out_vectors[:, :k_t]
    core = u_t.T @ w @ v_s
    sc = torch.linalg.svdvals(core)
    tol = (sc[0] * max(core.shape) * torch.finfo(sc.dtype).eps) if sc.numel() else 0
    return u_t @ core @ v_s.T, max(1, int((sc > tol).sum().item()))
