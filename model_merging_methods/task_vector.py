"""Task vectors (Ilharco et al., arXiv 2212.04089): δ = θ_ft − θ_pre, and θ = θ_pre + s·δ."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .options import StateDict
from .validation import is_excluded


def task_vector(finetuned: StateDict, base: StateDict) -> StateDict:
    """δ[name] = θ_ft[name] − θ_pre[name] for every name of `base`."""
    return {name: finetuned[name] - tensor for name, tensor in base.items()}


def apply_task_vector(base: StateDict, delta: StateDict, scale: float = 1.0) -> StateDict:
    """θ[name] = θ_pre[name] + s·δ[name] for every name of `base`."""
    return {name: tensor + scale * delta[name] for name, tensor in base.items()}


def squared_norm(finetuned: torch.Tensor, base: torch.Tensor) -> float:
    """‖θ_ft − θ_pre‖₂² of one tensor (or flat piece): δ in float32, its squares summed in float64."""
    return float((finetuned.float() - base.float()).double().square().sum())


def task_vector_norms(base: StateDict, models: list[StateDict], exclude_regex: Sequence[str] = ()) -> list[float]:
    """‖θ_k − θ_pre‖₂ of every model over the base's float tensors not excluded (sums of squared_norm)."""
    names = [n for n, t in base.items() if t.is_floating_point() and not is_excluded(n, exclude_regex)]
    return [math.sqrt(sum(squared_norm(model[n], base[n]) for n in names)) for model in models]
