"""PCB-merging, parameter competition balancing (Du et al., NeurIPS 2024, arXiv 2410.02396), on one tensor,
as the authors' `PCB_merge` (github.com/duguodong7/pcb-merging, pcb-merging.py) computes it.

Rows are the T task vectors of the tensor, flattened (d entries each):
  |τ_t| clamped per task to its [q_lo, q_hi] order statistics, q_lo = the (int(d·10⁻⁴))-th and q_hi the
  (int(d·(1 − 10⁻⁴)) − 1)-th smallest (0-based) |τ_t| entry; τ̃_t = sign(τ_t) · clamp(|τ_t|);
  intra-balancing  s_t = exp(T · norm(clamp|τ_t|)²)      norm(x) = (x − min x)/(max x − min x) per task
  inter-balancing  c_t = tanh(τ_t ⊙ Σ_j τ_j)              (the unclamped vectors)
  score  β_t = s_t ⊙ c_t;  drop: β_t clamped below at its (int(d·(1 − pcb_ratio)))-th smallest entry,
  then w_t = norm(β_t) (so the lowest (1 − pcb_ratio) of each task get weight 0)
  τ* = Σ_t w_t ⊙ τ̃_t / max(Σ_t w_t, 10⁻¹²);  θ* = θ_0 + λ · τ* (λ = scaling_factor).
Differences from the authors' code, stated: (1) the authors flatten the whole model into one row per task;
streaming needs one tensor at a time, so here every statistic (order statistics, min, max) is per tensor;
(2) where a task's values are all equal, norm() divides 0 by 0 in the authors' code (NaN); here such a row
normalises to 0. The order statistics are exact (torch.kthvalue, no sort). Every tensor follows this rule.
Defaults: pcb_ratio 0.1 (the authors' `PCB_merge` default; their example script uses 0.05), scaling_factor
1.0 (their evolutionary search starts from λ = 1 in [0.8, 1.3]).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .selection import kth_smallest

CLAMP_RATIO = 1e-4   # the authors' min_ratio = max_ratio for |τ| in PCB_merge


def _kth(rows: torch.Tensor, index: int) -> torch.Tensor:
    """The index-th smallest (0-based) entry of every row, shape [T, 1] (sorted_x[:, index] of the authors).

    float32 rows use the exact radix selection of selection.py (linear time; ~2× faster than torch.kthvalue
    here), split at zero for signed rows; other dtypes torch.kthvalue. Both give the exact order statistic."""
    if rows.dtype != torch.float32:
        return torch.kthvalue(rows, index + 1, dim=1, keepdim=True).values
    return torch.tensor([[_signed_kth(row, index)] for row in rows], dtype=rows.dtype)


def _signed_kth(row: torch.Tensor, index: int) -> float:
    """The index-th smallest (0-based) of a float32 row, by radix selection on magnitudes on each side of 0."""
    negative = row[row < 0]
    count = negative.numel()
    if index < count:            # among the negatives, ascending order is descending magnitude
        return -kth_smallest(negative, count - index)
    if count == 0:
        return kth_smallest(row, index + 1)
    return kth_smallest(row[row >= 0], index - count + 1)


def _clamp_rows(rows: torch.Tensor, min_ratio: float, max_ratio: float) -> torch.Tensor:
    """The authors' clamp(x, min_ratio, max_ratio) for a 2-D x: per row to [x_(int(d·min)), x_(int(d·(1−max))−1)]."""
    d = rows.shape[1]
    low = _kth(rows, int(d * min_ratio))
    high = _kth(rows, int(d * (1 - max_ratio) - 1)) if max_ratio else rows.max(dim=1, keepdim=True).values
    return torch.clamp(rows, low, high)


def _normalize_rows(rows: torch.Tensor) -> torch.Tensor:
    """(x − min)/(max − min) per row; a constant row gives 0 (the authors' code gives NaN there)."""
    low = rows.min(dim=1, keepdim=True).values
    span = rows.max(dim=1, keepdim=True).values - low
    return (rows - low) / torch.where(span > 0, span, torch.ones_like(span))


def pcb_tensor(deltas: Sequence[torch.Tensor], pcb_ratio: float = 0.1, scaling_factor: float = 1.0) -> torch.Tensor:
    """λ · τ* of PCB-merging for one tensor (module docstring)."""
    shape = deltas[0].shape
    checks = torch.stack([delta.reshape(-1) for delta in deltas])
    count = checks.shape[0]
    magnitudes = _clamp_rows(checks.abs(), CLAMP_RATIO, CLAMP_RATIO)
    clamped = torch.sign(checks) * magnitudes
    intra = torch.exp(count * _normalize_rows(magnitudes) ** 2)
    inter = torch.tanh(checks * checks.sum(dim=0))
    scores = intra * inter
    del intra, inter, magnitudes
    weights = _normalize_rows(_clamp_rows(scores, 1 - pcb_ratio, 0))
    merged = (clamped * weights).sum(dim=0) / torch.clamp(weights.sum(dim=0), min=1e-12)
    return merged.mul_(scaling_factor).reshape(shape)
