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
normalises to 0. The order statistics are exact (radix selection for float32, torch.kthvalue otherwise; no
sort), and everything else runs on cache-sized flat blocks (pcb_tensor). Every tensor follows this rule.
Defaults: pcb_ratio 0.1 (the authors' `PCB_merge` default; their example script uses 0.05), scaling_factor
1.0 (their evolutionary search starts from λ = 1 in [0.8, 1.3]).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .recipe_methods import by_blocks, flat_blocks
from .selection import rank_statistics_pieces, signed_order_statistics_pieces

CLAMP_RATIO = 1e-4   # the authors' min_ratio = max_ratio for |τ| in PCB_merge


def _row_kth(values: Callable[[slice], torch.Tensor], like: torch.Tensor, indices: list[int],
             signed: bool) -> list[torch.Tensor]:
    """The index-th smallest (0-based) of one row, for each index, exactly (sorted_x[:, index] of the authors),
    the row given block by block as values(s) over flat_blocks(like) (recomputed per pass, never whole on the
    CPU): float32 by radix selection (selection.py; `signed` rows on order-preserving keys), other dtypes
    (float64) by torch.kthvalue of the whole row. 0-dim tensors of the row's dtype."""
    blocks = flat_blocks(like)
    n = like.numel()
    if like.dtype != torch.float32 or like.device.type != "cpu":
        row = torch.cat([values(s) for s in blocks])
        return [torch.kthvalue(row, index + 1).values for index in indices]
    pieces = lambda: (values(s) for s in blocks)  # noqa: E731
    ks = [index + 1 for index in indices]
    found = signed_order_statistics_pieces(pieces, ks, n, torch.float32) if signed else \
        [stat.value for stat in rank_statistics_pieces(pieces, ks, n)]
    return [torch.tensor(value, dtype=like.dtype) for value in found]


def _span(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """max − min of a clamped row, 1 where it is 0 (the authors' norm() divides 0 by 0 there)."""
    span = high - low
    return torch.where(span > 0, span, torch.ones_like(span))


def pcb_tensor(deltas: Sequence[torch.Tensor], pcb_ratio: float = 0.1, scaling_factor: float = 1.0) -> torch.Tensor:
    """λ · τ* of PCB-merging for one tensor (module docstring), the rows' statistics first, then every
    elementwise step on cache-sized flat blocks (recipe_methods.by_blocks), the same values as on whole rows:
    min / max of a row clamped to [q_lo, q_hi] are q_lo and q_hi themselves (order statistics of the row), of
    the scores clamped below at their cut the cut and the row's maximum; sums over the tasks are per entry."""
    shape = deltas[0].shape
    rows = [delta.reshape(-1) for delta in deltas]
    count, d = len(rows), rows[0].numel()
    like = rows[0]
    magnitude_cut = [int(d * CLAMP_RATIO), int(d * (1 - CLAMP_RATIO) - 1)]
    bounds = [_row_kth(lambda s, row=row: row[s].abs(), like, magnitude_cut, signed=False) for row in rows]
    spans = [_span(low, high) for low, high in bounds]

    def clamped_magnitude(t: int, s: slice) -> torch.Tensor:
        return torch.clamp(rows[t][s].abs(), *bounds[t])

    def task_sum(s: slice) -> torch.Tensor:
        total = torch.zeros_like(rows[0][s])
        for row in rows:          # the tasks' sum per entry as checks.sum(dim=0): from +0, in task order
            total += row[s]
        return total

    def score(t: int, s: slice, total: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        intra = torch.exp(count * ((magnitude - bounds[t][0]) / spans[t]) ** 2)
        return intra * torch.tanh(rows[t][s] * total)

    cut = int(d * (1 - pcb_ratio))
    # each task's cut and maximum (its largest order statistic) in the same selection passes
    cuts = [_row_kth(lambda s, t=t: score(t, s, task_sum(s), clamped_magnitude(t, s)), like, [cut, d - 1],
                     signed=True) for t in range(count)]
    score_low = [low for low, _ in cuts]
    score_spans = [_span(low, high) for low, high in cuts]

    def merge(s: slice) -> torch.Tensor:
        total = task_sum(s)
        numerator, denominator = torch.zeros_like(rows[0][s]), torch.zeros_like(rows[0][s])
        for t in range(count):    # sums over the tasks as torch's sum(dim=0): from +0, in task order
            magnitude = clamped_magnitude(t, s)
            weight = (torch.clamp(score(t, s, total, magnitude), min=score_low[t]) - score_low[t]) / score_spans[t]
            numerator += torch.sign(rows[t][s]) * magnitude * weight
            denominator += weight
        return (numerator / torch.clamp(denominator, min=1e-12)).mul_(scaling_factor)

    return by_blocks(merge, like).view(shape)
