"""LiNeS, layer-increasing network scaling (Wang et al., "LiNeS: Post-training Layer Scaling Prevents
Forgetting and Enhances Model Merging", ICLR 2025, arXiv 2410.17146), on one tensor.

The merged multi-task vector τ_MTL of an underlying method (`lines_base`: task_arithmetic Σ_t τ_t by
default, or ties_merging / consensus_merging / any elementwise or per-tensor method at λ = 1) is scaled by
depth: a tensor of block ℓ ∈ {0, …, L−1} gets λ(ℓ) = α + β · ℓ / (L − 1); tensors outside the blocks
(embeddings, final norm, heads) get α. θ* = θ_0 + λ(ℓ) · τ_MTL. (The authors' `LiNeS_scaling`; with L = 1
the ratio ℓ/(L−1) is taken as 0, where their code divides by zero.)
α for multi-task merging is the authors' rule α = ‖Σ_t τ_t‖ / (T · ‖τ_MTL‖) (global L2 norms over the
merged tensors), which is exactly 1/T for task arithmetic; β is the tuned scale (the authors search
β ∈ (0, 1] on validation data; default here 1.0). Block index ℓ and depth L come from the caller (resolved
from tensor names and the config by utils/recipes/architecture.py), never from I/O here.
"""
from __future__ import annotations

import torch

LINES_BASES = ("task_arithmetic", "ties_merging", "consensus_merging")


def lines_scale(layer: int | None, num_layers: int, alpha: float, beta: float) -> float:
    """λ(ℓ) = α + β·ℓ/(L−1) for a tensor of block ℓ; α for a tensor outside the blocks (layer None)."""
    if layer is None:
        return alpha
    return alpha + beta * (layer / (num_layers - 1) if num_layers > 1 else 0.0)


def lines_default_alpha(num_models: int) -> float:
    """α of the authors' multi-task rule for task arithmetic: ‖Σ τ_t‖ / (T‖Σ τ_t‖) = 1/T."""
    return 1.0 / num_models


def lines_tensor(mtl: torch.Tensor, layer: int | None, num_layers: int, alpha: float, beta: float) -> torch.Tensor:
    """λ(ℓ) · τ_MTL for one tensor (in place on `mtl`)."""
    return mtl.mul_(lines_scale(layer, num_layers, alpha, beta))
