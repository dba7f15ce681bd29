"""Singular-vector merges of task matrices: TSV-M, Iso-C, Iso-CTS and CART, one weight matrix at a time.

Every function here merges ONE tensor: it takes the task vectors τ_t = θ_t − θ_pre of that tensor (one per
model, float32 or float64, all of the same shape) and returns the merged task vector τ* (the caller adds
θ_pre; CART's result already contains its average). A tensor is a *matrix* when it has two dimensions
(embeddings and output heads included, as FusionBench does: it decomposes every 2-D tensor not listed in
`exclude_keys`); every other tensor (norms, biases, 1-D or 4-D weights) follows the paper's rule for
non-matrix tensors, stated per method below.

Notation: r = min(m, n) for an m × n matrix; SVD(A) = U diag(s) Vᵀ with s descending (torch.linalg.svd,
full_matrices=False); polar(A) = U Vᵀ from that SVD (the orthogonal factor closest to A, which is what the
references' "SVD of the concatenated U, then U_u V_uᵀ" computes).

Faithfulness. The formulas are FusionBench 0.2.33's (task_singular_vector/utils/TSVM_utils.py
`compute_and_sum_svd_mem_reduction`, isotropic_merging/iso_utils.py `iso_c` / `iso_cts`) and the CART
authors' code; differences from them, all in exact arithmetic equalities:
- TSV-M orthogonalises the T·k kept columns (rows) only, where FusionBench zero-pads them to r columns first;
  the padding meets zero singular values, so the product is the same matrix (in exact arithmetic; in
  float32 the two agree to rounding, see scripts/compare_with_fusionbench.py).
- Iso-C multiplies mean(s)·polar(Σ τ_t) instead of U diag(mean(s)) Vᵀ (the same matrix).

Randomized SVD (ours, opt-in: CART's parameter `svd: randomized`): CART's rank-k truncations come from a
randomized range finder (Halko, Martinsson & Tropp 2011, Algorithm 4.4: Gaussian sketch of k + 10 columns from
a fixed seed, 4 power iterations with re-orthonormalisation) instead of the full SVD: O(m·n·k) instead of
O(m·n·r), an approximation whose error tests/test_frontier_methods.py bounds. Not offered for TSV-M: it
orthogonalises all r/T kept vectors of each task, the trailing ones included, so vectors a sketch finds only
approximately change its result (30% relative on the test's matrices); Iso-C and Iso-CTS use the whole spectrum.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .options import MergeError


def is_matrix(tensor: torch.Tensor) -> bool:
    """The tensors these methods decompose: two dimensions (FusionBench's `len(shape) == 2`)."""
    return tensor.dim() == 2


def _mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total.add_(tensor)
    return total.div_(len(tensors))


def _sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total.add_(tensor)
    return total


def _svd(matrix: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd (reduced); a LAPACK failure (no convergence, e.g. on NaN) is a MergeError naming `what`."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except RuntimeError as error:  # torch.linalg.LinAlgError is a RuntimeError
        raise MergeError(f"{what}: the SVD did not converge ({error})") from error


OVERSAMPLING, POWER_ITERATIONS = 10, 4


def top_svd(matrix: torch.Tensor, k: int, what: str, mode: str = "exact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first k singular triplets (U[:, :k], s[:k], Vᵀ[:k]) of `matrix`: from the exact reduced SVD, or
    ("randomized") from Q Bᵀ's SVD, Q an orthonormal basis of A·Ω (Ω: n × (k + OVERSAMPLING) Gaussian from a
    fixed seed, so the result depends only on the matrix) refined by POWER_ITERATIONS power iterations; the
    exact SVD when k + OVERSAMPLING ≥ min(m, n), where a sketch saves nothing."""
    if mode == "exact" or k + OVERSAMPLING >= min(matrix.shape):
        u, s, vh = _svd(matrix, what)
        return u[:, :k], s[:k], vh[:k]
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    sketch = torch.randn(matrix.shape[1], k + OVERSAMPLING, generator=generator, dtype=matrix.dtype,
                         device=matrix.device)
    basis = torch.linalg.qr(matrix @ sketch).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u, s, vh = _svd(basis.T @ matrix, what)
    return (basis @ u)[:, :k], s[:k], vh[:k]


def polar(matrix: torch.Tensor, what: str = "polar") -> torch.Tensor:
    """U Vᵀ of the reduced SVD of `matrix`: the nearest matrix with orthonormal columns (rows, if wide)."""
    u, _, vh = _svd(matrix, what)
    return u @ vh


def tsv_merge_tensor(deltas: Sequence[torch.Tensor], alpha: float = 1.0, what: str = "tsv_merging") -> torch.Tensor:
    """TSV-M (Gargiulo et al., CVPR 2025, arXiv 2412.00081) on one tensor; returns α · τ*.

    Matrix: k = int(r / T) (FusionBench: int(r · (1/T))). For each task, τ_t = U_t diag(s_t) V_tᵀ and its
    first k triplets are kept; U = [U_1[:, :k] … U_T[:, :k]] (m × Tk), s = [s_1[:k] … s_T[:k]],
    Vᵀ = [V_1ᵀ[:k]; …; V_Tᵀ[:k]] (Tk × n); τ* = polar(U) diag(s) polar(Vᵀ).
    Non-matrix tensors: the mean of the task vectors, (1/T) Σ τ_t (FusionBench; the paper's code likewise).
    Both are then multiplied by α (FusionBench `alpha`, default 1; a list of per-model α scales each τ_t
    before the merge instead — callers pass those as weights). A matrix of rank r < T keeps int(r/T) = 0
    vectors: its merged task vector is 0, as in FusionBench (θ* = θ_pre there).
    """
    if not is_matrix(deltas[0]):
        return _mean(deltas).mul_(alpha)
    count = len(deltas)
    rank = min(deltas[0].shape)
    k = int(rank * (1 / count))
    if k == 0:   # rank < T: FusionBench keeps no singular vector, so the matrix's merged task vector is 0
        return torch.zeros_like(deltas[0])
    us, ss, vhs = [], [], []
    for delta in deltas:
        u, s, vh = top_svd(delta, k, what)
        us.append(u)
        ss.append(s)
        vhs.append(vh)
    u_orth = polar(torch.cat(us, dim=1), what)
    vh_orth = polar(torch.cat(vhs, dim=0), what)
    return (u_orth * torch.cat(ss)) @ vh_orth * alpha


def iso_c_tensor(deltas: Sequence[torch.Tensor], scaling_factor: float = 1.0, what: str = "iso_c") -> torch.Tensor:
    """Iso-C (Marczak et al., ICML 2025, arXiv 2502.04959) on one tensor; returns scaling_factor · τ*.

    Matrix: M = Σ_t τ_t = U diag(s) Vᵀ; τ* = mean(s) · U Vᵀ (the spectrum made flat, "isotropic").
    Non-matrix tensors: the mean (1/T) Σ τ_t (FusionBench's `iso_c`).
    """
    if not is_matrix(deltas[0]):
        return _mean(deltas).mul_(scaling_factor)
    u, s, vh = _svd(_sum(deltas), what)
    return (u @ vh).mul_(s.mean() * scaling_factor)


def iso_cts_split(shape: Sequence[int], count: int, common_space_fraction: float) -> tuple[int, int]:
    """(common dimensions k_c, dimensions per task k_t) of Iso-CTS for a matrix of `shape` and `count` tasks:
    k_c = int(r·f), then k_c = r − round((r − k_c)/T)·T so that the task-specific part divides by T;
    k_t = int((r − k_c)/T)."""
    rank = min(shape)
    common = int(rank * common_space_fraction)
    common = rank - round((rank - common) / count) * count
    return common, int((rank - common) / count)


def iso_cts_tensor(deltas: Sequence[torch.Tensor], scaling_factor: float = 1.0, common_space_fraction: float = 0.8,
                   what: str = "iso_cts") -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025, arXiv 2502.04959) on one tensor; returns scaling_factor · τ*.

    Matrix: M = Σ_t τ_t = U diag(s) Vᵀ; common space U_c = U[:, :k_c], s_c, V_cᵀ (iso_cts_split). Per task,
    the part outside the common space τ_t' = τ_t − U_c U_cᵀ τ_t = U_t' diag(s_t') V_t'ᵀ keeps its first k_t
    triplets. Û = polar([U_1'[:, :k_t] … U_T'[:, :k_t], U_c]), V̂ᵀ = polar([…; V_cᵀ]) (FusionBench's order:
    tasks first, the common space last), ŝ = mean of the r concatenated singular values;
    τ* = ŝ · Û V̂ᵀ. Non-matrix tensors: the mean (1/T) Σ τ_t.
    """
    if not is_matrix(deltas[0]):
        return _mean(deltas).mul_(scaling_factor)
    count = len(deltas)
    common, per_task = iso_cts_split(deltas[0].shape, count, common_space_fraction)
    u, s, vh = _svd(_sum(deltas), what)
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    del u, vh
    us, ss, vhs = [], [], []
    for delta in deltas:
        outside = delta - u_c @ (u_c.T @ delta)
        u_t, s_t, vh_t = _svd(outside, what)
        us.append(u_t[:, :per_task])
        ss.append(s_t[:per_task])
        vhs.append(vh_t[:per_task])
    spectrum = torch.cat(ss + [s_c])
    u_hat = polar(torch.cat(us + [u_c], dim=1), what)
    vh_hat = polar(torch.cat(vhs + [vh_c], dim=0), what)
    return (u_hat @ vh_hat).mul_(spectrum.mean() * scaling_factor)


def low_rank(matrix: torch.Tensor, rank: int, what: str = "low rank", svd: str = "exact") -> torch.Tensor:
    """The best rank-`rank` approximation U[:, :k] diag(s[:k]) V[:k]ᵀ (Eckart–Young; top_svd's `svd` mode)."""
    u, s, vh = top_svd(matrix, rank, what, svd)
    return (u * s) @ vh


def cart_rank(shape: Sequence[int], rank_ratio: float) -> int:
    """CART's kept rank: max(1, int(rank_ratio · min(m, n))) (the authors' `_svd_with_truncation_ratio`)."""
    return max(1, int(rank_ratio * min(shape)))


def cart_tensor(deltas: Sequence[torch.Tensor], rank_ratio: float = 0.1, scaling_factor: float = 1.0,
                what: str = "cart", svd: str = "exact") -> torch.Tensor:
    """CART, centred arithmetic with rank reduction (Choi et al., "Revisiting Weight Averaging for Model
    Merging", arXiv 2412.12153), on one tensor; returns τ* such that θ* = θ_pre + τ*.

    τ̄ = (1/T) Σ_t τ_t (so θ_pre + τ̄ is the weight average); centred vectors c_t = τ_t − τ̄ = θ_t − θ_avg.
    Matrix: τ* = τ̄ + λ Σ_t LR_k(c_t), LR_k the rank-k truncated SVD, k = cart_rank(shape, rank_ratio).
    Non-matrix tensors: τ* = τ̄ + λ Σ_t c_t = τ̄ (the centred vectors sum to zero: the weight average), as in
    the authors' code, which adds the untruncated centred vectors there. `svd`: top_svd's mode for LR_k.
    """
    average = _mean(deltas)
    if not is_matrix(deltas[0]):
        return average
    k = cart_rank(deltas[0].shape, rank_ratio)
    total = torch.zeros_like(average)
    for delta in deltas:
        total.add_(low_rank(delta - average, k, what, svd))
    return total.mul_(scaling_factor).add_(average)
