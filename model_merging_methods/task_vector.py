"""Task vectors (Ilharco et al., arXiv 2212.04089): δ = θ_ft − θ_pre, and θ = θ_pre + s·δ."""
from __future__ import annotations

from .options import StateDict


def task_vector(finetuned: StateDict, base: StateDict) -> StateDict:
    """δ[name] = θ_ft[name] − θ_pre[name] for every name of `base`."""
    return {name: finetuned[name] - tensor for name, tensor in base.items()}


def apply_task_vector(base: StateDict, delta: StateDict, scale: float = 1.0) -> StateDict:
    """θ[name] = θ_pre[name] + s·δ[name] for every name of `base`."""
    return {name: tensor + scale * delta[name] for name, tensor in base.items()}
