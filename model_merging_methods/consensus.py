"""Consensus merging with TALL masks (Wang et al., "Localizing Task Information for Improved Model Merging
and Compression", ICML 2024, arXiv 2405.07813), on one tensor; elementwise.

τ_MTL is the multi-task vector of the underlying method: task arithmetic Σ_t τ_t (`consensus_base:
task_arithmetic`, the default) or the TIES merge of the τ_t (`ties_merging`: per-tensor trim to `density`,
sign election, disjoint mean; this project's ties_merging at λ = 1).
TALL mask of task t:  m_t = [ |τ_t| > λ_tall · |τ_MTL − τ_t| ]   (strict, as FusionBench / the authors:
|θ_0 − θ_t| > λ|θ_mt − θ_t| with θ_mt = θ_0 + τ_MTL).
Consensus mask:        m = [ Σ_t m_t ≥ k ]   (k = prun_thre_k: 2 drops "selfish" and "catastrophic" weights,
1 only catastrophic ones, 0 nothing, > T everything).
Result: θ* = θ_0 + α · (m ⊙ τ_MTL), α = scaling_factor.
Every tensor follows this rule (the method is elementwise; the authors apply it to the whole flattened
model). Defaults: tall_mask_lambda 0.6 (FusionBench's TALL-mask config; the paper picks λ_t ∈ {0.2, …, 0.6}
per task on validation data, which a data-free merge cannot), prun_thre_k 2 (the paper's choice),
scaling_factor 1.0 (the paper tunes α on validation data).
FusionBench has the TALL masks (fusion_bench/method/tall_mask) but no consensus merge; the mask formula is
checked against its `generate_task_masks`, the consensus step against the authors' `construct_consensus_mask`
(formula, float64 tests).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .ties import _trim, disjoint_merge, trim_threshold

CONSENSUS_BASES = ("task_arithmetic", "ties_merging")


def multi_task_vector(deltas: Sequence[torch.Tensor], base: str = "task_arithmetic",
                      density: float | Sequence[float] = 0.2) -> torch.Tensor:
    """τ_MTL of one tensor: Σ_t τ_t, or the TIES merge (trim per tensor to `density` — one value, or one per
    model — elect, disjoint mean)."""
    if base == "task_arithmetic":
        total = deltas[0].clone()
        for delta in deltas[1:]:
            total.add_(delta)
        return total
    densities = [float(density)] * len(deltas) if isinstance(density, (int, float)) else list(density)
    trimmed = [_trim(delta.clone(), trim_threshold(delta, d)) for delta, d in zip(deltas, densities)]
    return disjoint_merge(trimmed, [1.0] * len(deltas), "count", 1.0)


def tall_masks(deltas: Sequence[torch.Tensor], mtl: torch.Tensor, tall_mask_lambda: float) -> list[torch.Tensor]:
    """m_t = |τ_t| > λ · |τ_MTL − τ_t| for every task (boolean tensors)."""
    return [delta.abs() > (mtl - delta).abs().mul_(tall_mask_lambda) for delta in deltas]


def consensus_tensor(deltas: Sequence[torch.Tensor], tall_mask_lambda: float = 0.6, prun_thre_k: int = 2,
                     scaling_factor: float = 1.0, consensus_base: str = "task_arithmetic",
                     density: float | Sequence[float] = 0.2) -> torch.Tensor:
    """α · (m ⊙ τ_MTL) for one tensor (module docstring)."""
    mtl = multi_task_vector(deltas, consensus_base, density)
    votes = torch.zeros_like(mtl)
    for mask in tall_masks(deltas, mtl, tall_mask_lambda):
        votes.add_(mask.to(votes.dtype))
    return mtl.mul_(votes >= prun_thre_k).mul_(scaling_factor)
