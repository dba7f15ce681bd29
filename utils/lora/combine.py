"""Merging LoRA adapters of one base in adapter space, one module at a time (pure functions, no I/O).

PEFT's combination types, with the semantics of ``LoraModel.add_weighted_adapter`` (peft 0.13 – 0.21; the
per-tensor rules are PEFT's own ``peft.utils.merge_utils`` functions, called here):

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (all adapters of one rank):
  the rule is applied to the A factors and, separately, to the B factors, adapter k's weight split as
  A-weight ``sign(w_k s_k)·sqrt(|w_k s_k|)`` and B-weight ``sqrt(|w_k s_k|)`` (s_k: its LoRA scaling).
  The result is NOT Σ w_k s_k B_k A_k (cross terms B_j A_k appear): PEFT calls it "a very rough
  approximation".
- ``cat``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]: exactly Σ w_k s_k B_k A_k, rank Σ r_k.
- ``svd`` and ``<rule>_svd``: the rule over the full deltas ΔW_k = s_k B_k A_k (task_arithmetic for
  ``svd``), then the best rank-r approximation (r = svd_rank, default the largest input rank):
  B = U_r diag(S_r), A = V_rᵀ; ``svd_clamp`` clamps both to the q-quantile of their entries.

The merged adapter has r = new rank and lora_alpha = r (scaling 1), as PEFT's.

KnOTS (Stoica et al., ICLR 2025; FusionBench's ``subspace_alignment``): the deltas ΔW_k are concatenated
along the input dimension and decomposed once, [ΔW_1 … ΔW_n] = U diag(S) [V_1ᵀ … V_nᵀ] (float64, singular
values ≤ eps dropped), so every task is ΔW_k = U diag(S) V_kᵀ in one shared basis; a rule (task
arithmetic, TIES, DARE) then merges the aligned coefficients V_kᵀ and ΔW = U diag(S) V_mergedᵀ, written
exactly as B = U diag(S), A = V_mergedᵀ (rank = number of kept singular values ≤ Σ r_k).

Random draws (dare_*): PEFT draws from torch's global generator in module order; here each module's draws
come from a generator seeded by (seed, module name), in PEFT's order within the module (A factors, then B
factors, adapter by adapter), so a module's result does not depend on which other modules exist.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .combinations import COMBINATIONS, FACTOR_RULES, KNOTS_RULES, SVD_RULES  # noqa: F401 (declared without torch)
DENSITY_RULES = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}


class CombineError(ValueError):
    """Adapters that cannot be combined this way (the message names the module and the reason)."""


@dataclass(frozen=True)
class Factors:
    """One adapter's LoRA factors for one module, as PEFT stores them (A: r × in, B: out × r; embeddings:
    A: r × num_embeddings, B: dim × r), with its scaling and whether its delta is (B A)ᵀ."""
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    transpose: bool = False

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """PEFT's get_delta_weight (float32): transpose(B @ A) · scaling."""
        product = self.b.float() @ self.a.float()
        return (product.T if self.transpose else product) * self.scaling


@dataclass(frozen=True)
class CombineOptions:
    combination: str = "linear"
    density: float | None = None          # ties / dare_* / magnitude_prune keep fraction
    majority_sign_method: str = "total"   # ties / dare_ties: "total" or "frequency"
    svd_rank: int | None = None           # *_svd: output rank (default: the largest input rank)
    svd_clamp: float | None = None        # *_svd: quantile at which U and Vᵀ entries are clamped
    knots_eps: float = 1e-4               # KnOTS: singular values kept are > eps (FusionBench's default)
    seed: int = 0

    def validate(self) -> None:
        if self.combination not in COMBINATIONS:
            raise CombineError(f"unknown combination {self.combination!r}; choose from {', '.join(COMBINATIONS)}")
        rule = _rule(self.combination)
        if rule in DENSITY_RULES and (self.density is None or not 0 <= self.density <= 1):
            raise CombineError(f"combination {self.combination} needs a density in [0, 1], got {self.density}")
        if self.majority_sign_method not in ("total", "frequency"):
            raise CombineError(f"majority_sign_method must be total or frequency, got {self.majority_sign_method!r}")
        if self.svd_rank is not None and self.svd_rank < 1:
            raise CombineError(f"svd_rank must be ≥ 1, got {self.svd_rank}")
        if self.svd_clamp is not None and not 0 < self.svd_clamp <= 1:
            raise CombineError(f"svd_clamp is a quantile in (0, 1], got {self.svd_clamp}")
        if not self.knots_eps >= 0:
            raise CombineError(f"knots_eps must be ≥ 0, got {self.knots_eps}")


def _rule(combination: str) -> str:
    return SVD_RULES.get(combination) or KNOTS_RULES.get(combination) or combination


def apply_rule(rule: str, tensors: list[torch.Tensor], weights: torch.Tensor, options: CombineOptions) -> torch.Tensor:
    """One of PEFT's merge_utils rules over same-shaped tensors (stacked on a new first dimension)."""
    from peft.utils import merge_utils

    if rule == "linear":
        return merge_utils.task_arithmetic(tensors, weights)
    if rule == "ties":
        return merge_utils.ties(tensors, weights, options.density, options.majority_sign_method)
    if rule == "dare_linear":
        return merge_utils.dare_linear(tensors, weights, options.density)
    if rule == "dare_ties":
        return merge_utils.dare_ties(tensors, weights, options.density, options.majority_sign_method)
    if rule == "magnitude_prune":
        return merge_utils.magnitude_prune(tensors, weights, options.density)
    raise CombineError(f"unknown rule {rule!r}")


def output_rank(combination: str, ranks: list[int], options: CombineOptions) -> int:
    """The merged adapter's r, as add_weighted_adapter sets it (KnOTS: the largest possible, Σ r_k)."""
    if combination in FACTOR_RULES:
        if len(set(ranks)) != 1:
            raise CombineError(f"combination {combination} needs adapters of one rank, got ranks {sorted(set(ranks))} "
                               f"(use cat, svd or a *_svd / knots_* combination)")
        return ranks[0]
    if combination == "cat" or combination in KNOTS_RULES:
        return sum(ranks)
    return options.svd_rank or max(ranks)


def combine_module(module: str, factors: list[Factors | None], weights: list[float], options: CombineOptions,
                   rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the merged adapter for one module; `factors[k]` is None where adapter k leaves the module
    alone (it is skipped, as PEFT skips it). `rank`: output_rank of the whole merge (cat pads with zeros)."""
    present = [(f, w) for f, w in zip(factors, weights) if f is not None]
    if not present:
        raise CombineError(f"module {module!r}: no adapter has it")
    combination = options.combination
    with torch.random.fork_rng(devices=[]):
        from model_merging_methods.randomness import derive_seed

        torch.manual_seed(derive_seed(options.seed, 0, module))
        if combination == "cat":
            return _cat(present, rank)
        if combination in FACTOR_RULES:
            return _factor_rule(present, options)
        if combination in SVD_RULES:
            return _svd(present, options, rank)
        return _knots(present, options)


def _cat(present: list[tuple[Factors, float]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    first = present[0][0]
    a_rows = [f.a * w * f.scaling for f, w in present]   # PEFT: A · weight · scaling, in this order
    a = torch.zeros(rank, first.a.shape[1], dtype=a_rows[0].dtype)
    b = torch.zeros(first.b.shape[0], rank, dtype=first.b.dtype)
    stacked_a, stacked_b = torch.cat(a_rows, dim=0), torch.cat([f.b for f, _ in present], dim=1)
    a[:stacked_a.shape[0]] = stacked_a
    b[:, :stacked_b.shape[1]] = stacked_b
    return a, b


def _factor_rule(present: list[tuple[Factors, float]], options: CombineOptions) -> tuple[torch.Tensor, torch.Tensor]:
    weights_a, weights_b = [], []
    for factors, weight in present:
        scaled = weight * factors.scaling
        sign = 1 if scaled >= 0 else -1   # the sign goes on one side only, or it would cancel
        weights_a.append(math.sqrt(abs(scaled)) * sign)
        weights_b.append(math.sqrt(abs(scaled)))
    rule = options.combination
    dtype = present[0][0].a.dtype
    a = apply_rule(rule, [f.a for f, _ in present], torch.tensor(weights_a), options)
    b = apply_rule(rule, [f.b for f, _ in present], torch.tensor(weights_b), options)
    return a.to(dtype), b.to(dtype)


def _svd(present: list[tuple[Factors, float]], options: CombineOptions, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [f.delta() for f, _ in present]
    delta = apply_rule(SVD_RULES[options.combination], deltas, torch.tensor([w for _, w in present]), options)
    if present[0][0].transpose:   # back to B @ A's orientation (out × in)
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    if options.svd_clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), options.svd_clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u


def subspace_alignment(deltas: list[torch.Tensor], eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 list[torch.Tensor]]:
    """KnOTS alignment: [ΔW_1 … ΔW_n] = U diag(S) [V_1ᵀ … V_nᵀ] in float64, keeping singular values > eps;
    returns U, S, [V_kᵀ] in the deltas' dtype (FusionBench's subspace_alignment)."""
    dtype, columns = deltas[0].dtype, deltas[0].shape[1]
    u, s, vh = torch.linalg.svd(torch.cat(deltas, dim=1).to(torch.float64), full_matrices=False)
    keep = s > eps
    return u[:, keep].to(dtype), s[keep].to(dtype), list(torch.split(vh[keep].to(dtype), columns, dim=1))


def _knots(present: list[tuple[Factors, float]], options: CombineOptions) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [f.delta().T if f.transpose else f.delta() for f, _ in present]   # B @ A orientation
    u, s, vhs = subspace_alignment(deltas, options.knots_eps)
    merged = apply_rule(KNOTS_RULES[options.combination], vhs, torch.tensor([w for _, w in present]), options)
    return merged, u * s   # A = V_mergedᵀ (k × in), B = U diag(S) (out × k)
