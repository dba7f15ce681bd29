"""TIES-merging (Yadav et al., arXiv 2306.01708): trim, elect sign, disjoint merge."""
from __future__ import annotations

import torch

from .options import MergeOptions, StateDict
from .selection import PIECE, kth_smallest, kth_smallest_pieces


def trim_rank(numel: int, density: float) -> int:
    """k = int(n·(1 − density)): the rank of the trim threshold among the n magnitudes (0: no trim)."""
    return max(int(numel * (1.0 - density)), 0)


def trim_threshold(delta: torch.Tensor, density: float) -> float:
    """MergeLM's trim threshold: t = the k-th smallest |δ|, k = trim_rank(n, density); 0 when k = 0.

    Entries with |δ| ≥ t are kept (the top n − k + 1 entries, plus ties at t). Radix selection on
    the bit patterns of |δ| (selection.py): no sort and no copy of the tensor."""
    k = trim_rank(delta.numel(), density)
    return kth_smallest(delta, k) if k else 0.0


def ties_merging(base: StateDict, deltas: list[StateDict], options: MergeOptions,
                 statistics: list[StateDict] | None = None) -> StateDict:
    """θ* = θ_pre + λ · merge(trim(δ_k)),  δ_k = θ_k − θ_pre (the function receives the δ_k).

    1. trim: δ̃_k = δ_k ⊙ [|δ_k| ≥ t_k] with t_k = trim_threshold(δ_k, density_k), taken per tensor
       (default) or, with ``ties_trim="global"`` (MergeLM's GLUE code), over the model's whole
       flattened delta. `statistics[k][name]`, when given, holds a precomputed per-tensor t_k (the
       streaming engine computes it on the whole tensor and then merges flat pieces).
    2. elect: s = sign(Σ_k w_k δ̃_k); where the sum is 0, s = +1 per tensor (as mergekit), or the
       majority sign sign(Σ s) of the whole model with global trim (as MergeLM / the TIES code; when
       Σ s is itself 0 the elected sign is 0 there, as MergeLM, so those coordinates merge to 0).
    3. disjoint merge over agreeing non-zero entries a_k = [sign(δ̃_k) = s]:
       ``count`` (paper):  Σ_k a_k w_k δ̃_k / max(Σ_k a_k, 1)
       ``weights`` (mergekit): Σ_k a_k w_k δ̃_k / Σ_k a_k w_k   (0 → 1)
    """
    weights = options.model_weights(len(deltas), 1.0)
    densities = options.densities(len(deltas))
    if options.ties_trim == "global":
        thresholds = [_global_threshold(delta, d) for delta, d in zip(deltas, densities)]
        thresholds = [{name: t for name in base} for t in thresholds]
        majority = _majority_sign(deltas, thresholds, weights)
    elif statistics is not None:
        thresholds = [{name: float(stats[name]) for name in base} for stats in statistics]
        majority = 1.0
    else:
        thresholds = [{n: trim_threshold(t, d) for n, t in delta.items()} for delta, d in zip(deltas, densities)]
        majority = 1.0
    merged = {}
    for name, pre in base.items():
        trimmed = [_trim(delta[name], t[name]) for delta, t in zip(deltas, thresholds)]
        merged[name] = disjoint_merge(trimmed, weights, options.ties_normalize, majority).mul_(
            options.scaling_coefficient).add_(pre)
    return merged


def _trim(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """δ ⊙ [|δ| ≥ t]: hardshrink keeps |δ| > λ, and λ = the float32 just below t makes that |δ| ≥ t."""
    if threshold <= 0.0:
        return delta
    below = torch.nextafter(torch.tensor(threshold, dtype=torch.float32), torch.tensor(0.0)).item()
    return torch.nn.functional.hardshrink(delta, below)


def disjoint_merge(trimmed: list[torch.Tensor], weights: list[float], normalize: str,
                   zero_sign: float) -> torch.Tensor:
    """Elect s = sign(Σ_k w_k δ̃_k) (zero sums → zero_sign) and average the agreeing entries.

    Agreement a_k = [δ̃_k · s > 0] (exact zeros never agree). The trimmed tensors are overwritten."""
    total = trimmed[0] * weights[0]
    for delta, weight in zip(trimmed[1:], weights[1:]):
        total.add_(delta, alpha=weight)
    sign = torch.sign(total)
    sign.masked_fill_(sign == 0, zero_sign)
    numerator, divisor = total.zero_(), torch.zeros_like(total)
    for delta, weight in zip(trimmed, weights):
        agreeing = delta.mul_(sign).clamp_min_(0.0)           # |δ̃_k| where it agrees with s, else 0
        numerator.add_(agreeing, alpha=weight)
        divisor.add_(agreeing.sign_(), alpha=weight if normalize == "weights" else 1.0)
    if normalize == "count":
        divisor.clamp_min_(1.0)
    else:
        divisor.masked_fill_(divisor == 0, 1.0)
    return numerator.div_(divisor).mul_(sign)


def _global_threshold(delta: StateDict, density: float) -> float:
    """trim_threshold of the model's whole flattened delta, selected over its tensors' pieces (no concatenation)."""
    numel = sum(t.numel() for t in delta.values())
    k = trim_rank(numel, density)
    pieces = lambda: (piece for t in delta.values() for piece in t.reshape(-1).split(PIECE))  # noqa: E731
    return kth_smallest_pieces(pieces, k, numel) if k else 0.0


def _majority_sign(deltas: list[StateDict], thresholds: list[dict[str, float]], weights: list[float]) -> float:
    """sign(Σ over all coordinates of sign(Σ_k w_k δ̃_k)); 0 on a tie (MergeLM's ``torch.sign`` of the
    sum: zero-sum coordinates then elect 0 and merge to 0)."""
    total = 0.0
    for name in deltas[0]:
        summed = torch.zeros_like(deltas[0][name])
        for delta, t, weight in zip(deltas, thresholds, weights):
            summed.add_(delta[name] * (delta[name].abs() >= t[name]), alpha=weight)
        total += float(torch.sign(summed).sum())
    return 1.0 if total > 0 else -1.0 if total < 0 else 0.0
