"""Spherical linear interpolation of two models, one angle per tensor."""
from __future__ import annotations

import math

import torch

from .options import MergeOptions, StateDict

COLINEAR_THRESHOLD = 0.9995


def slerp_tensor(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """y = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, cos Ω = ⟨a/‖a‖, b/‖b‖⟩ over the flattened tensors.

    When |cos Ω| > 0.9995 (near-colinear) the result is the linear (1−t)·a + t·b. Norms ≤ 1e-8 count
    as 1. t = 0 gives a, t = 1 gives b.
    """
    norm_a = float(a.norm()) or 1.0
    norm_b = float(b.norm()) or 1.0
    norm_a = norm_a if norm_a > 1e-8 else 1.0
    norm_b = norm_b if norm_b > 1e-8 else 1.0
    cos = max(-1.0, min(1.0, float((a.reshape(-1) @ b.reshape(-1))) / (norm_a * norm_b)))
    if abs(cos) > COLINEAR_THRESHOLD:
        return torch.lerp(a, b, t)
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    return a * (math.sin((1 - t) * omega) / sin_omega) + b * (math.sin(t * omega) / sin_omega)


def slerp_merging(base: StateDict, models: list[StateDict], options: MergeOptions,
                  statistics=None) -> StateDict:
    """θ* = slerp(θ_base, θ_1, t) per tensor (t = slerp_t)."""
    return {name: slerp_tensor(pre, models[0][name], options.slerp_t) for name, pre in base.items()}
