"""Fisher merging (Matena & Raffel, arXiv 2111.09832) and RegMean (Jin et al., arXiv 2212.09849).

Both take statistics collected elsewhere (the GLUE pipeline); parameters without statistics are averaged.
"""
from __future__ import annotations

import math

import torch

from .options import MergeError, MergeOptions, StateDict


def fisher_merging(base: StateDict | None, models: list[StateDict], options: MergeOptions,
                   statistics: list[StateDict]) -> StateDict:
    """θ* = Σ_k c_k (F_k + ε) θ_k / Σ_k c_k (F_k + ε), elementwise, with diagonal Fishers F_k.

    c_k = fisher_coefficients (default 1/K). With fisher_normalize (MergeLM): n_k = global L2 norm
    of F_k over all merged tensors, c_k ← c_k · (1/(n_k + ε)) / Σ_j 1/(n_j + ε). ε = fisher_eps.
    """
    eps = options.fisher_eps
    coefficients = ([1.0 / len(models)] * len(models) if options.fisher_coefficients is None
                    else [float(c) for c in options.fisher_coefficients])
    if len(coefficients) != len(models):
        raise MergeError(f"fisher_coefficients: got {len(coefficients)} values for {len(models)} models")
    names = [n for n in models[0] if n in statistics[0]]
    if options.fisher_normalize:
        norms = [math.sqrt(sum(float(fisher[n].float().pow(2).sum()) for n in names)) for fisher in statistics]
        inverse = [1.0 / (norm + eps) for norm in norms]
        coefficients = [c * inv / sum(inverse) for c, inv in zip(coefficients, inverse)]
    merged = {}
    for name in models[0]:
        if name not in statistics[0]:
            merged[name] = sum(model[name] for model in models) / len(models)
            continue
        scaled = [c * (fisher[name].float() + eps) for c, fisher in zip(coefficients, statistics)]
        numerator = sum(s * model[name] for s, model in zip(scaled, models))
        merged[name] = numerator / sum(scaled)
    return merged


def shrink_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α·G + (1 − α)·diag(G): off-diagonal entries scaled by α, diagonal kept."""
    return alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))


def regmean_merging(base: StateDict | None, models: list[StateDict], options: MergeOptions,
                    statistics: list[StateDict]) -> StateDict:
    """For each linear weight W_k [out, in] with Gram G_k = XᵀX/n [in, in]:
    W* = ((Σ_k G̃_k)^(-1) Σ_k G̃_k W_kᵀ)ᵀ, G̃ = shrink_gram(G, α). Other parameters: (1/K) Σ_k θ_k."""
    merged = {}
    for name in models[0]:
        if name not in statistics[0]:
            merged[name] = sum(model[name] for model in models) / len(models)
            continue
        grams = [shrink_gram(stats[name].double(), options.regmean_alpha) for stats in statistics]
        rhs = sum(g @ model[name].double().T for g, model in zip(grams, models))  # [in, out]
        try:
            solution = torch.linalg.solve(sum(grams), rhs)
        except RuntimeError as error:
            raise MergeError(f"regmean: the summed Gram matrix of {name} is singular ({error})") from error
        merged[name] = solution.T.to(models[0][name].dtype).contiguous()
    return merged
