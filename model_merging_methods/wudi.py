"""WUDI-merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors", ICML 2025, arXiv 2503.08099) on one tensor, as FusionBench 0.2.33 runs it
(fusion_bench/method/wudi/wudi.py `wudi_merging`).

Matrix (2-D) tensors: minimise L(τ) = Σ_t ‖(τ − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F by Adam (lr 1e-5, no weight decay,
torch's defaults otherwise) for `iter_num` steps from τ⁰ = Σ_t τ_t; the result is τ after the last step
(not the minimiser: the trajectory is the method). Non-matrix tensors: the mean (1/T) Σ_t τ_t. No final
scaling (FusionBench adds the result to θ_pre as it is).

The gradient is formed in closed form, ∇L = 2 (τ A − B) with A = Σ_t τ_tᵀ τ_t / ‖τ_t‖² and
B = Σ_t τ_t τ_tᵀ τ_t / ‖τ_t‖² computed once (or, when the other side is smaller, τ A = Σ_t (τ τ_tᵀ) τ_t /
‖τ_t‖²): one matrix product per step instead of FusionBench's autograd through T products. It is the same
gradient up to float rounding, and the same torch.optim.Adam consumes it, so the results agree to
rounding (scripts/compare_with_fusionbench.py). The optimisation runs on `device` in float32 (as FusionBench
runs float32 models; float64 inputs stay float64).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .options import MergeError


def wudi_tensor(deltas: Sequence[torch.Tensor], iter_num: int = 400, lr: float = 1e-5,
                device: str | torch.device = "cpu", what: str = "wudi_merging") -> torch.Tensor:
    """τ* of WUDI-merging for one tensor (module docstring); returned on the inputs' device and dtype."""
    first = deltas[0]
    if first.dim() != 2:
        total = first.clone()
        for delta in deltas[1:]:
            total.add_(delta)
        return total.div_(len(deltas))
    if iter_num < 0:
        raise MergeError(f"{what}: iter_num must be ≥ 0, got {iter_num}")
    compute = torch.float64 if first.dtype == torch.float64 else torch.float32
    tvs = [delta.to(device=device, dtype=compute) for delta in deltas]
    norms = [float(tv.square().sum()) for tv in tvs]
    if any(norm == 0.0 for norm in norms):
        zero = [index for index, norm in enumerate(norms) if norm == 0.0]
        raise MergeError(f"{what}: the task vector of model(s) {zero} is zero, so the loss divides by ‖τ_t‖² = 0")
    rows, cols = first.shape
    count = len(tvs)
    # τA costs 2·m·n² per step on the column side, 4·T·m²·n on the row side
    column_side = cols <= 2 * count * rows
    merged = torch.nn.Parameter(torch.stack(tvs).sum(dim=0))
    with torch.no_grad():
        if column_side:
            gram = sum(tv.T @ tv / norm for tv, norm in zip(tvs, norms))
            target = sum(tv @ (tv.T @ tv) / norm for tv, norm in zip(tvs, norms))
        else:
            target = sum((tv @ tv.T) @ tv / norm for tv, norm in zip(tvs, norms))
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    for _ in range(iter_num):
        with torch.no_grad():
            value = merged.detach()
            if column_side:
                product = value @ gram
            else:
                product = sum((value @ tv.T) @ tv / norm for tv, norm in zip(tvs, norms))
            merged.grad = product.sub_(target).mul_(2.0)
        optimizer.step()
    return merged.detach().to(device=first.device, dtype=first.dtype)
