"""Weight averaging and task arithmetic.

Like every method function, these receive private float32 copies from merge_state_dicts and may
accumulate in the models' storage instead of allocating.
"""
from __future__ import annotations

from .options import MergeOptions, StateDict


def average_merging(base: StateDict | None, models: list[StateDict], options: MergeOptions,
                    statistics=None) -> StateDict:
    """θ* = Σ_k w_k θ_k / Σ_k w_k (w_k = 1 by default: the plain mean of Model Soups / MergeLM).

    The base model is not used (with DARE the models already are θ_pre + DARE(δ_k))."""
    weights = options.model_weights(len(models), 1.0)
    total = sum(weights)
    if total == 0:
        raise ValueError("average_merging: the model weights sum to 0")
    merged = {}
    for name in models[0]:
        acc = models[0][name].mul_(weights[0]) if weights[0] != 1.0 else models[0][name]
        for model, weight in zip(models[1:], weights[1:]):
            acc.add_(model[name], alpha=weight)
        merged[name] = acc.div_(total)
    return merged


def task_arithmetic(base: StateDict, deltas: list[StateDict], options: MergeOptions,
                    statistics=None) -> StateDict:
    """θ* = θ_pre + λ Σ_k w_k δ_k, δ_k = θ_k − θ_pre  (w_k = 1 by default; λ = scaling_coefficient)."""
    return add_weighted_deltas(base, deltas, options.model_weights(len(deltas), 1.0), options.scaling_coefficient)


def add_weighted_deltas(base: StateDict, deltas: list[StateDict], weights: list[float], scaling: float) -> StateDict:
    """θ_pre + λ Σ_k w_k δ_k per tensor, accumulated in place in the first model's delta (model order)."""
    merged = {}
    for name, pre in base.items():
        acc = deltas[0][name].mul_(weights[0]) if weights[0] != 1.0 else deltas[0][name]
        for delta, weight in zip(deltas[1:], weights[1:]):
            acc.add_(delta[name], alpha=weight)
        merged[name] = acc.mul_(scaling).add_(pre)
    return merged


def passthrough_single(base: StateDict | None, models: list[StateDict], options: MergeOptions,
                       statistics=None) -> StateDict:
    """θ* = θ'_1: the one (possibly DARE-processed) model, unchanged."""
    return dict(models[0])
