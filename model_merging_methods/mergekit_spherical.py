"""mergekit 0.1.5's spherical methods: nuslerp, multislerp, karcher (recipe names, mergekit's semantics).

Each function merges one output tensor in the compute dtype it is given (a recipe's `dtype`, else the
promoted input dtype) and reproduces mergekit 0.1.5's arithmetic operation by operation: the same torch
operations on tensors of the same shapes and dtypes, so on the same torch build, device and thread count
the result has the same bits (scripts/compare_with_mergekit.py checks it; tests/test_mergekit_frontier.py
checks the formulas). Our own code, written from the formulas below.

All three need whole-tensor norms and dot products, so the recipe engine gives them one whole tensor
(across the inputs) at a time; their norms are single torch reductions over the tensor, whose rounding
depends on how torch splits them, which pieces could not reproduce.
"""
from __future__ import annotations

import torch

from .options import MergeError
from .recipe_methods import TensorGroupCall, by_blocks, flat_blocks, sum_in_order
from .validation import is_finite


def checked(method: str, result: torch.Tensor) -> torch.Tensor:
    """The result of one of these methods, refused (MergeError) when it holds NaN or Inf; the recipe
    engine adds the tensor's name."""
    if not is_finite(result):
        raise MergeError(f"{method}: the merged tensor is not finite (NaN/Inf)")
    return result


# ----------------------------------------------------------------------------------------------
# nuslerp


def nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool = False, flatten: bool = True,
                 eps: float = 1e-8) -> torch.Tensor:
    """Slerp of v0 and v1 at t along vectors: the whole flattened tensor (flatten, the default), else each
    vector along the last axis (rows of a matrix), or along axis 0 with row_wise (columns).

    u_i = v_i / max(‖v_i‖, 1e-7); c = clamp(⟨u_0, u_1⟩, −1, 1); θ = acos c;
    y = (sin((1−t)θ)·v0 + sin(tθ)·v1) / sin θ, or (1−t)·v0 + t·v1 where 1 − c² ≤ eps² (colinear).
    The unnormalised v_i are interpolated (so norms are interpolated too, unlike a unit slerp)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0.mul_(u1), dim=-1, keepdim=True).clamp(-1, 1)
    del u0, u1
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    # one angle (flatten, or a single row): only the branch that torch.where would pick is computed
    single = colinear.numel() == 1
    if single and bool(colinear):
        result = (1 - t) * v0
        result += t * v1
    else:
        result = torch.sin((1 - t) * theta) * v0
        result += torch.sin(t * theta) * v1
        result /= sin_theta
        if not single:
            result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp_t(weights: list[float]) -> float:
    """t = w_1 / (w_0 + w_1), or 0.5 when |w_0 + w_1| < 1e-6 (mergekit's nuslerp weights)."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def nuslerp_tensor(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None = None,
                   row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """mergekit's nuslerp of two models with weights (w_0, w_1): t = nuslerp_t(w); without a base,
    nuslerp_pair(t, x_0, x_1); with one, b + nuslerp_pair(t, x_0 − b, x_1 − b) (task vectors)."""
    t = nuslerp_t(weights)
    if flatten:
        return _nuslerp_flat(t, tensors[0], tensors[1], base)
    if base is None:
        return nuslerp_pair(t, tensors[0], tensors[1], row_wise, flatten)
    return base + nuslerp_pair(t, tensors[0] - base, tensors[1] - base, row_wise, flatten)


def _nuslerp_flat(t: float, x0: torch.Tensor, x1: torch.Tensor, base: torch.Tensor | None,
                  eps: float = 1e-8) -> torch.Tensor:
    """(b +) nuslerp_pair(t, v0, v1) with flatten (one angle) for v_i = x_i (− b), the same operations with
    the elementwise ones on cache-sized flat blocks: whole tensors only for each ‖v_i‖ (v_i formed for its
    norm, then freed) and for the product u_0·u_1 that torch's sum reads."""
    flat0, flat1 = x0.reshape(-1), x1.reshape(-1)
    flat_base = base.reshape(-1) if base is not None else None
    every = slice(None)
    v = lambda flat, s: flat[s] if flat_base is None else flat[s] - flat_base[s]  # noqa: E731  (same bits)
    n0 = torch.norm(v(flat0, every), dim=-1, keepdim=True).clamp(min=1e-7)
    n1 = torch.norm(v(flat1, every), dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(by_blocks(lambda s: (v(flat0, s) / n0).mul_(v(flat1, s) / n1), flat0),
                    dim=-1, keepdim=True).clamp(-1, 1)
    colinear = bool((1 - cos.square()) <= eps ** 2)
    theta = torch.acos(torch.zeros_like(cos) if colinear else cos)
    sin_theta = torch.sin(theta)
    first, second = ((1 - t), t) if colinear else (torch.sin((1 - t) * theta), torch.sin(t * theta))

    def combine(s: slice) -> torch.Tensor:
        result = first * v(flat0, s)
        result += second * v(flat1, s)
        if not colinear:
            result /= sin_theta
        return result if flat_base is None else flat_base[s] + result

    return by_blocks(combine, flat0).view(x0.shape)


def nuslerp(call: TensorGroupCall) -> torch.Tensor:
    keys = call.non_base
    return checked("nuslerp", nuslerp_tensor([call.tensors[k] for k in keys], call.values("weight", keys),
                                             call.tensors[call.base] if call.base is not None else None,
                                             call.params["nuslerp_row_wise"], call.params["nuslerp_flatten"]))


# ----------------------------------------------------------------------------------------------
# multislerp


def multislerp_tensor(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None = None,
                      normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (mergekit's multislerp), of x_i (or δ_i = x_i − b with
    a base, b added back at the end), each flattened:
    w ← w / Σw (normalize_weights); u_i = δ_i / (‖δ_i‖ + eps); m = Σ w_i u_i, m ← m / ‖m‖;
    tangent vectors τ_i = u_i − ⟨u_i, m⟩ m; τ = Σ w_i τ_i; ‖τ‖' = ‖τ‖ + eps;
    y = (m cos ‖τ‖' + τ sin ‖τ‖' / ‖τ‖') · Σ w_i ‖δ_i‖.
    Memory: a few tensors, whatever the number of models: each δ_i and u_i is recomputed where it is needed
    and the cross-model sums run one model at a time (the same bits as mergekit's operations on the stack).
    One input: that input (the base ignored). ‖m‖ < eps (antipodal inputs that cancel): with two inputs
    the linear w_0 δ_0 + w_1 δ_1 (+ b), with more a MergeError."""
    if len(tensors) == 1:
        return tensors[0]
    like = tensors[0]
    w = torch.tensor(weights, dtype=like.dtype, device=like.device)
    if normalize_weights:
        w = w / w.sum()
    flat = [x.reshape(-1) for x in tensors]
    flat_base = base.reshape(-1) if base is not None else None
    every = slice(None)
    delta = lambda i, s=every: flat[i][s] if base is None else flat[i][s] - flat_base[s]  # noqa: E731  (recomputed: same bits)
    norms = torch.stack([torch.norm(delta(i), dim=-1, keepdim=True) for i in range(len(tensors))])
    unit = lambda i, s: delta(i, s) / (norms[i] + eps)  # noqa: E731
    # the elementwise steps run on cache-sized flat blocks (the same bits), so a whole tensor's temporaries
    # are the few results that the whole-tensor reductions read: m, one product ⟨u_i, m⟩ at a time, τ, y
    mean = by_blocks(lambda s: sum_in_order((unit(i, s) * w[i] for i in range(len(tensors))), flat[0][s]),
                      flat[0])
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            result = delta(0) * w[0] + delta(1) * w[1]
            result = result.view(like.shape)
            return result + base if base is not None else result
        raise MergeError("multislerp: the weighted sum of the unit inputs is zero (antipodal inputs whose "
                         "weights cancel); change the weights")
    mean.div_(mean_norm)
    product = torch.empty_like(mean)
    dots = []
    for i in range(len(tensors)):          # ⟨u_i, m⟩: torch's sum over the whole product, as mergekit's
        by_blocks(lambda s: unit(i, s) * mean[s], flat[0], out=product)
        dots.append(product.sum(-1, keepdim=True))
    del product

    def tangent_term(i: int, s: slice) -> torch.Tensor:          # w_i (u_i − ⟨u_i, m⟩ m)
        u = unit(i, s)
        u -= dots[i] * mean[s]
        return u.mul_(w[i])

    tangent = by_blocks(lambda s: sum_in_order((tangent_term(i, s) for i in range(len(tensors))), flat[0][s]),
                         flat[0])
    tangent_norm = torch.norm(tangent) + eps
    cosine, ratio, scale = torch.cos(tangent_norm), torch.sin(tangent_norm) / tangent_norm, (norms.squeeze(-1) * w).sum()

    def combine(s: slice) -> torch.Tensor:
        result = mean[s] * cosine
        result += tangent[s] * ratio
        result = result * scale
        return result + flat_base[s] if base is not None else result

    return by_blocks(combine, flat[0]).view(like.shape)


def multislerp(call: TensorGroupCall) -> torch.Tensor:
    keys = call.non_base
    return checked("multislerp", multislerp_tensor([call.tensors[k] for k in keys], call.values("weight", keys),
                                                   call.tensors[call.base] if call.base is not None else None,
                                                   call.params["normalize_weights"], call.params["eps"]))


# ----------------------------------------------------------------------------------------------
# karcher


NORM_COPY_MAX = 1 << 24   # karcher: tensors up to this many entries take their norm from a float32 copy


def karcher_tensor(tensors: list[torch.Tensor], alphas: list[float] | None = None, max_iter: int = 10,
                   tol: float = 1e-5) -> torch.Tensor:
    """The weighted Karcher (Riemannian) mean on the unit sphere, rescaled (mergekit's karcher; alphas
    default to 1/n each, as its recipes use). Norms in float32 (float64 for float64 inputs):
    u_i = x_i / ‖x_i‖ (0 for x_i = 0); inputs with ‖x_i‖ ≤ tol are left out, a_i = α_i / Σ_valid α;
    start m = normalise(Σ a_i u_i) (u_0 if that norm < tol); up to max_iter times:
    θ_i = acos clamp(⟨m, u_i⟩, −1, 1), τ = Σ_{θ_i ≥ tol} a_i θ_i / sin θ_i · (u_i − ⟨m, u_i⟩ m);
    stop when ‖τ‖ < tol, else m ← normalise(cos ‖τ‖ m + sin ‖τ‖ τ/‖τ‖) (normalise when the norm > tol).
    y = (Σ_i α_i ‖x_i‖) · m (every input's norm, with the unnormalised α). No valid input: zeros."""
    if len(tensors) == 1:
        return tensors[0]
    if alphas is None:
        alphas = [1.0 / len(tensors)] * len(tensors)
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    # mergekit computes vector_norm(x.to(dtype)); vector_norm(x, dtype=...) upcasts inside the reduction, the
    # same value without a float32 copy but 5× slower on CPUs (scripts/compare_mergekit_kernels.py checks both):
    # the copy up to NORM_COPY_MAX entries, the in-reduction upcast above (memory)
    norm_of = lambda x: torch.linalg.vector_norm(x.to(dtype) if x.numel() <= NORM_COPY_MAX else x,  # noqa: E731
                                                 dtype=dtype)
    norms = [norm_of(tensor) for tensor in tensors]
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)
    valid_alphas = [alphas[i] for i in valid]
    alpha_sum = sum(valid_alphas)
    coefficients = [alpha / alpha_sum for alpha in valid_alphas]
    # u_i = x_i / ‖x_i‖ is recomputed where it is used (same bits) instead of held for every input, and every
    # elementwise step runs on cache-sized flat blocks (recipe_methods.by_blocks): whole-tensor buffers only for what torch's
    # reductions read (m, the unit in ⟨m, u_i⟩, τ), no whole float32 temporaries (their page faults were most
    # of the time)
    flat = [tensor.reshape(-1) for tensor in tensors]
    like = flat[valid[0]]
    unit = lambda i, s: (flat[i][s] / norms[i]).to(flat[i].dtype)  # noqa: E731

    def weighted_units(s: slice) -> torch.Tensor:
        mean = torch.zeros_like(like[s])
        for coefficient, i in zip(coefficients, valid):
            mean += coefficient * unit(i, s)
        return mean

    mean = by_blocks(weighted_units, like)
    mean_norm = norm_of(mean)
    if mean_norm.item() < tol:
        mean = by_blocks(lambda s: unit(valid[0], s), like)
    else:
        by_blocks(lambda s: (mean[s] / mean_norm).to(mean.dtype), like, out=mean)
    buffer = torch.empty_like(mean)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for coefficient, i in zip(coefficients, valid):
            current = by_blocks(lambda s: unit(i, s), like, out=buffer)
            dot = torch.clamp(torch.dot(mean, current), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            factor = coefficient * (theta / torch.sin(theta))

            for s in flat_blocks(like):                            # τ += a·θ/sin θ·(u − ⟨m, u⟩ m)
                step = dot * mean[s]
                torch.sub(current[s], step, out=step)
                tangent[s] += step.mul_(factor)
        tangent_norm = norm_of(tangent)
        if tangent_norm.item() < tol:
            break
        cosine, sine = torch.cos(tangent_norm), torch.sin(tangent_norm)
        by_blocks(lambda s: (cosine * mean[s] + sine * (tangent[s] / tangent_norm)).to(mean.dtype), like, out=mean)
        del tangent
        unit_norm = norm_of(mean)
        if unit_norm.item() > tol:
            by_blocks(lambda s: (mean[s] / unit_norm).to(mean.dtype), like, out=mean)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return (scale * mean).view(tensors[0].shape)


def karcher(call: TensorGroupCall) -> torch.Tensor:
    return checked("karcher", karcher_tensor(list(call.tensors.values()), None, call.params["max_iter"],
                                             call.params["tol"]))


__all__ = ["checked", "karcher", "karcher_tensor", "multislerp", "multislerp_tensor", "nuslerp", "nuslerp_pair",
           "nuslerp_t", "nuslerp_tensor"]
