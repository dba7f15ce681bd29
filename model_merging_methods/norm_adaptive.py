"""Norm-adaptive task arithmetic: each model weighted by a decreasing function of its task vector's global L2 norm.

A model whose fine-tuning moved the weights far (large ‖δ‖) gets a small weight, so that one large task
vector does not drown the others (the "adaptive" merge of task-vector toolkits).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .linear import add_weighted_deltas
from .options import NORM_MODES, MergeError, MergeOptions, StateDict
from .validation import is_excluded


def norm_adaptive_weights(norms: Sequence[float], mode: str = "exp", alpha: float = 1.5,
                          beta: float = 1.0) -> list[float]:
    """Weights w_i (summing to 1) from the global L2 norms L_i = ‖δ_i‖₂ of the task vectors.

    linear: w_i ∝ 1/L_i;  power: w_i ∝ L_i^(−α);  exp: w_i ∝ exp(−β·L_i / mean(L)), mean over all models.
    Each is evaluated as a softmax of the log-weights (no overflow or underflow for any norms).

    Zero norms (a model with δ = 0, a no-op for the merge):
    - linear / power: 1/0 is undefined, so such a model gets weight 0 and the others are normalised among
      themselves (the merge is the one of the other models, as if the zero model had not been given);
    - exp: exp(−β·0/mean) = 1 is finite, so the model keeps its share, as in the toolkit's published
      example (norms 182.63, 31.87, 0, 0.529, 9.26 → weights 0.0052, 0.1485, 0.3021, 0.2986, 0.2457):
      its weight multiplies δ = 0, which scales the other task vectors down.
    All norms zero (nothing to weight), a negative or non-finite norm, or an empty list: MergeError.
    """
    if mode not in NORM_MODES:
        raise MergeError(f"unknown norm mode {mode!r}; valid: {', '.join(NORM_MODES)}")
    norms = [float(n) for n in norms]
    if not norms:
        raise MergeError("norm_adaptive: no norms given")
    for index, norm in enumerate(norms):
        if not math.isfinite(norm) or norm < 0:
            raise MergeError(f"norm_adaptive: the norm of model {index} is {norm}; norms must be finite and ≥ 0")
    if not math.isfinite(alpha) or not math.isfinite(beta):
        raise MergeError(f"norm_adaptive: alpha = {alpha} and beta = {beta} must be finite")
    if all(norm == 0.0 for norm in norms):
        raise MergeError("norm_adaptive: every task vector has L2 norm 0 (the models equal the base); "
                         "there is nothing to weight")
    if mode == "exp":
        mean = sum(norms) / len(norms)
        scores = [-beta * norm / mean for norm in norms]
    else:
        exponent = 1.0 if mode == "linear" else alpha
        scores = [-exponent * math.log(norm) if norm > 0 else -math.inf for norm in norms]
    top = max(scores)
    exps = [math.exp(score - top) for score in scores]
    total = sum(exps)
    return [value / total for value in exps]


def norm_adaptive_merging(base: StateDict, deltas: list[StateDict], options: MergeOptions,
                          statistics=None) -> StateDict:
    """θ* = θ_pre + λ Σ_i w_i δ_i, w = norm_adaptive_weights(options.norms, options.norm_mode,
    options.norm_alpha, options.norm_beta), λ = scaling_coefficient.

    options.norms are the global L2 norms ‖δ_i‖₂ over every merged tensor: merge_state_dicts computes
    them from the whole models when they are not given, the streaming engine in a first pass (or reads
    them from an analysis.json). A per-tensor call cannot know them, so they are required here."""
    if options.norms is None:
        raise MergeError("norm_adaptive needs the global L2 norms of the task vectors (options.norms)")
    if options.weights is not None:
        raise MergeError("norm_adaptive computes its model weights from the norms; do not also pass weights")
    if len(options.norms) != len(deltas):
        raise MergeError(f"norm_adaptive: got {len(options.norms)} norms for {len(deltas)} models")
    weights = norm_adaptive_weights(options.norms, options.norm_mode, options.norm_alpha, options.norm_beta)
    return add_weighted_deltas(base, deltas, weights, options.scaling_coefficient)


def squared_norm(finetuned: torch.Tensor, base: torch.Tensor) -> float:
    """‖θ_ft − θ_pre‖₂² of one tensor (or flat piece): δ in float32, its squares summed in float64."""
    return float((finetuned.float() - base.float()).double().square().sum())


def task_vector_norms(base: StateDict, models: list[StateDict], exclude_regex: Sequence[str] = ()) -> list[float]:
    """‖θ_k − θ_pre‖₂ of every model over the base's float tensors not excluded (sums of squared_norm, so the
    streaming engine, summing the same squares piece by piece, finds the same norms)."""
    names = [n for n, t in base.items() if t.is_floating_point() and not is_excluded(n, exclude_regex)]
    return [math.sqrt(sum(squared_norm(model[n], base[n]) for n in names)) for model in models]
