"""TIES-merging (Yadav et al., arXiv 2306.01708): trim, elect sign, disjoint merge."""
from __future__ import annotations

import torch

from .options import MergeOptions, StateDict
from .sparsify import trim_to_density
from .selection import kth_smallest


def ties_merging(base: StateDict, models: list[StateDict], options: MergeOptions,
                 statistics=None) -> StateDict:
    """θ* = θ_pre + λ · merge(trim(δ_k)).

    1. trim: keep the top density_k fraction of |δ_k| — per tensor (exactly int(d·n) entries, ties by
       index; default), or ``ties_trim="global"`` as MergeLM's GLUE code: over the model's whole
       flattened delta, keep |δ| ≥ the k-th smallest |δ|, k = int(N·(1 − d)).
    2. elect: s = sign(Σ_k w_k δ̃_k); coordinates with s = 0 take the majority sign sign(Σ s) of
       the tensor (per-tensor) or of the whole model (global).
    3. disjoint merge over agreeing non-zero entries a_k = [sign(δ̃_k) = s]:
       ``count`` (paper):  Σ_k a_k w_k δ̃_k / max(Σ_k a_k, 1)
       ``weights`` (mergekit): Σ_k a_k w_k δ̃_k / Σ_k a_k w_k   (0 → 1)
    """
    weights = options.model_weights(len(models), 1.0)
    densities = options.densities(len(models))
    deltas = [{name: model[name] - pre for name, pre in base.items()} for model in models]
    if options.ties_trim == "global":
        deltas = [_trim_global(delta, d) for delta, d in zip(deltas, densities)]
        majority = _majority_sign_global(deltas, weights)
    else:
        deltas = [{n: trim_to_density(t, d) for n, t in delta.items()} for delta, d in zip(deltas, densities)]
        majority = None
    merged = {}
    for name, pre in base.items():
        stacked = torch.stack([delta[name] for delta in deltas])  # [K, *shape]
        merged[name] = pre + options.scaling_coefficient * _disjoint_merge(
            stacked, weights, options.ties_normalize, majority)
    return merged


def elect_sign(stacked: torch.Tensor, weights: list[float], majority: float | None = None) -> torch.Tensor:
    """s = sign(Σ_k w_k δ_k); zeros → the majority sign (of this tensor unless given)."""
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    sign = torch.sign((stacked * w).sum(0))
    if majority is None:
        majority = 1.0 if float(sign.sum()) >= 0 else -1.0
    return torch.where(sign == 0, torch.full_like(sign, majority), sign)


def _disjoint_merge(stacked: torch.Tensor, weights: list[float], normalize: str,
                    majority: float | None) -> torch.Tensor:
    sign = elect_sign(stacked, weights, majority)
    agree = (torch.sign(stacked) == sign).to(stacked.dtype)  # exact zeros never agree
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    numerator = (stacked * agree * w).sum(0)
    if normalize == "count":
        return numerator / agree.sum(0).clamp_min(1.0)
    divisor = (agree * w).sum(0)
    return numerator / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def _trim_global(delta: StateDict, density: float) -> StateDict:
    """MergeLM: keep |δ| ≥ t, t = k-th smallest |δ| of the whole flattened model, k = int(N·(1−d))."""
    flat = torch.cat([t.reshape(-1) for t in delta.values()]).abs()
    k = int(flat.numel() * (1.0 - density))
    if k == 0:
        return delta
    threshold = kth_smallest(flat, k)
    return {n: t.masked_fill(t.abs() < threshold, 0.0) for n, t in delta.items()}


def _majority_sign_global(deltas: list[StateDict], weights: list[float]) -> float:
    total = 0.0
    for name in deltas[0]:
        stacked = torch.stack([d[name] for d in deltas])
        w = torch.tensor(weights).view(-1, *[1] * (stacked.dim() - 1))
        total += float(torch.sign((stacked * w).sum(0)).sum())
    return 1.0 if total >= 0 else -1.0
