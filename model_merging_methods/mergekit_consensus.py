"""mergekit 0.1.5's task-vector methods sce, ram, ramplus_tl and arcee_fusion (recipe names, its semantics).

Each function merges one output tensor in the compute dtype it is given (a recipe's `dtype`, else the
promoted input dtype) with mergekit 0.1.5's arithmetic, operation by operation: the same torch operations
on tensors of the same shapes and dtypes, so on the same torch build, device and thread count the bits
are the same (scripts/compare_with_mergekit.py checks it; tests/test_mergekit_frontier.py checks the
formulas). The one exception is arcee_fusion on tensors of more than 10^6 entries, where mergekit
estimates quartiles from 10^6 entries drawn with its global RNG and we take the exact quartiles (see
arcee_fusion_tensor). Our own code, written from the formulas below.

Two of them return float32 for bfloat16 / float16 compute, as mergekit does (a float32 mask or scale
meets the task vectors): ramplus_tl and arcee_fusion; mergekit then saves float32 tensors unless the
recipe sets `out_dtype`, and so do we (RecipeMethod.float32_result).

ram is elementwise (each output entry depends on the same entry of the inputs), so the recipe engine
streams it in flat pieces; ramplus_tl needs each model's whole-tensor counts of shared and unique entries
first (integers: any piece order gives the same counts, see ramplus_tl_lambdas).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .mergekit_spherical import checked
from .recipe_methods import ELEMENTWISE_BLOCK, TensorGroupCall, in_blocks, sum_in_order
from .selection import PATTERNS, as_mask, magnitude_above, signed_order_statistics
from .sort_window import topk_keep


# ----------------------------------------------------------------------------------------------
# sce


VARIANCE_BLOCK = 1 << 16   # entries per block of population_variance's float64 recurrence (stays in cache)


def population_variance(task_vectors: torch.Tensor) -> torch.Tensor:
    """torch.var(task_vectors, dim=0, unbiased=False), the same bits. For bfloat16 / float16 on the CPU torch
    runs its generic Welford reduction in float64 entry by entry (~150 ns an entry: 45 % of an SCE merge); the
    same recurrence is vectorised here over blocks of entries: for j = 1..N, δ = x_j − μ, μ ← μ + δ / j,
    m2 ← m2 + δ·(x_j − μ); var = m2 / N, rounded to float32 and then to the dtype (c10's double → half
    conversion). Other dtypes and devices: torch.var itself (its float32 CPU path is a different, two-pass
    algorithm)."""
    if task_vectors.device.type != "cpu" or task_vectors.dtype not in (torch.bfloat16, torch.float16):
        return torch.var(task_vectors, dim=0, unbiased=False)
    count = task_vectors.shape[0]
    flat = task_vectors.reshape(count, -1)
    return _welford_variance(lambda j, s: flat[j, s], count, flat.shape[1], task_vectors.dtype).view(
        task_vectors.shape[1:])


def _welford_variance(row: Callable[[int, slice], torch.Tensor], count: int, numel: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """population_variance's recurrence over blocks of VARIANCE_BLOCK entries, `row(j, s)` giving block s of
    task vector j (a row of a stack, or x_j − b formed block by block: no stack); flat result in `dtype`."""
    out = torch.empty(numel, dtype=dtype)
    for start in range(0, numel, VARIANCE_BLOCK):
        s = slice(start, min(start + VARIANCE_BLOCK, numel))
        mean, m2 = np.zeros(s.stop - start), np.zeros(s.stop - start)
        for j in range(count):
            x = row(j, s).float().numpy().astype(np.float64)
            delta = x - mean
            mean += delta / (j + 1)
            m2 += delta * (x - mean)
        out[s] = torch.from_numpy((m2 / count).astype(np.float32)).to(dtype)
    return out


def sce_select_mask(task_vectors: torch.Tensor | None, select_topk: float, mask_dtype: torch.dtype,
                    variance: torch.Tensor | None = None) -> torch.Tensor:
    """SCE "select": 1 at the k = int(c·select_topk) entries of largest variance across the models
    (population variance over axis 0 of the stacked task vectors, or `variance` given; c = the number of
    entries with non-zero variance; a given `variance` is overwritten by its |·|), else 0. select_topk ≤ 0:
    all 0; ≥ 1: all 1. Ties at the k-th variance: torch.topk's choice (as mergekit)."""
    like = variance if variance is not None else task_vectors[0]
    if select_topk <= 0:
        return torch.zeros_like(like, dtype=mask_dtype)
    if select_topk >= 1:
        return torch.ones_like(like, dtype=mask_dtype)
    if variance is None:
        variance = population_variance(task_vectors)
    k = int(torch.count_nonzero(variance) * select_topk)
    if k == 0:
        return torch.zeros_like(variance, dtype=mask_dtype)
    # torch.topk's entries, without its nth_element on the CPU (sort_window.topk_keep: replayed, checked);
    # |variance| in place (the values mergekit's variance.abs() holds, without a second whole tensor)
    return as_mask(topk_keep(variance.abs_(), k), mask_dtype)


def sce_weights_of(task_vectors) -> torch.Tensor:
    """SCE "calculate": w_i = mean(δ_i²) / Σ_j mean(δ_j²) (the sum as a Python float); 1/n each when
    |Σ_j mean(δ_j²)| < 1e-6. Takes the δ_i one at a time (the same per-row means as mergekit's square of
    the stacked task vectors)."""
    weights = torch.stack([delta.square().mean() for delta in task_vectors])
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def sce_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """sce_weights_of the rows of stacked task vectors [n, ...]."""
    return sce_weights_of(task_vectors.reshape(task_vectors.shape[0], -1))


def _agreeing(deltas: list[torch.Tensor], summed: torch.Tensor) -> list[torch.Tensor]:
    """SCE's erase masks [sign δ_i = s], s = + where Σ_i δ_i ≥ 0 (else −): δ_i > 0 (s = +) or δ_i < 0 (s = −)
    as torch compares (0 and NaN never agree; −0 ≥ 0 elects +). On the CPU, from bit patterns (NumPy): s = +
    ⇔ bits(Σ) ≤ inf's or bits(Σ) is −0's; δ_i agrees ⇔ bits(δ_i) − low ≤ inf's − 1 (unsigned, wrapping) with
    low = 1 for s = + and sign bit | 1 for s = −: 5–10× faster than torch's bfloat16 comparisons."""
    if summed.device.type != "cpu" or summed.dtype not in PATTERNS:
        positive = summed >= 0
        return [torch.where(positive, d > 0, d < 0) for d in deltas]
    integer, unsigned, magnitude, infinity = PATTERNS[summed.dtype]
    sign = unsigned(magnitude + 1)
    patterns = lambda x: x.contiguous().view(integer).reshape(-1).numpy().view(unsigned)  # noqa: E731
    total = patterns(summed)
    positive = (total <= unsigned(infinity)) | (total == sign)
    low = np.bitwise_or(np.left_shift(np.logical_not(positive).astype(unsigned), unsigned(8 * total.itemsize - 1)),
                        unsigned(1))
    return [torch.from_numpy(np.subtract(patterns(d), low) <= unsigned(infinity - 1)).view(d.shape) for d in deltas]


def sce_tensor(base: torch.Tensor, others: list[torch.Tensor], select_topk: float = 1.0,
               int8_mask: bool = False) -> torch.Tensor:
    """SCE (Wan et al. 2024, FuseChat, arXiv 2408.07990) as mergekit 0.1.5 computes it:
    δ_i = x_i − b; select: δ_i ← δ_i ⊙ sce_select_mask (select_topk < 1); calculate: w_i = sce_weights;
    erase: s = sign(Σ_i δ_i) with 0 → +, e_i = [sign δ_i = s] (0 entries never agree);
    y = b + Σ_i w_i e_i δ_i / max(Σ_i w_i e_i, 1e-6). No model weights, no density (the paper's
    parameters are select_topk only). int8_mask stores the masks as int8 (memory; same values).
    Memory: with select_topk ≥ 1, or < 1 in bfloat16 / float16 on the CPU, a few tensors (each δ_i is
    recomputed where it is used), else the stacked task vectors; the cross-model sums run one model at a time
    (same bits as mergekit's sums over the stack), and the erase and merge steps, which are elementwise, on
    cache-sized blocks."""
    if not others:
        return base
    # the erase and merge steps read blocks of `inputs`; block_deltas(b, blocks) turns them into the δ_i
    if select_topk < 1:               # the selection needs every model's δ at once (variance across models)
        mask_dtype = torch.int8 if int8_mask else base.dtype
        if base.device.type == "cpu" and base.dtype in (torch.bfloat16, torch.float16):
            # the variance's recurrence reads blocks of x_i − b (the stack's rows, bit for bit), and each
            # selected δ_i·mask is formed where it is used: no stacked task vectors
            flat_base, flat = base.reshape(-1), [x.reshape(-1) for x in others]
            variance = _welford_variance(lambda j, s: flat[j][s] - flat_base[s], len(others), base.numel(),
                                         base.dtype).view(base.shape)
            mask = sce_select_mask(None, select_topk, mask_dtype, variance=variance)
            del variance
            delta = lambda i: (others[i] - base) * mask  # noqa: E731  (stacked *= mask: the same product)
            inputs = [*others, mask]
            block_deltas = lambda b, blocks: [(x - b) * blocks[-1] for x in blocks[:-1]]  # noqa: E731
        else:
            stacked = torch.empty((len(others),) + tuple(base.shape), dtype=base.dtype, device=base.device)
            for row, x in zip(stacked, others):
                torch.sub(x, base, out=row)
            stacked *= sce_select_mask(stacked, select_topk, mask_dtype).unsqueeze(0)
            delta = lambda i: stacked[i]  # noqa: E731
            inputs = list(stacked)
            block_deltas = lambda b, blocks: blocks  # noqa: E731
    else:                             # δ_i recomputed where it is used (same bits): a few tensors in memory
        delta = lambda i: others[i] - base  # noqa: E731
        inputs = others
        block_deltas = lambda b, blocks: [x - b for x in blocks]  # noqa: E731
    weights = sce_weights_of(delta(i) for i in range(len(others)))
    finite_weights = bool(torch.isfinite(weights).all())

    def erase_and_merge(b: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
        # elementwise from here (cache-sized blocks, the same bits as whole tensors)
        deltas = block_deltas(b, blocks)
        # (int8 or not, mergekit's erase masks hold the same ±1 / 0 values: booleans here); w_i·e_i is
        # exactly w_i where model i agrees, else 0 (a 0/1 mask times a finite w_i ≥ 0, or torch.where)
        agree = _agreeing(deltas, sum_in_order(deltas, b))
        if finite_weights:
            erased = [as_mask(a, b.dtype).mul_(weights[i]) for i, a in enumerate(agree)]
        else:
            erased = [torch.where(a, weights[i], 0) for i, a in enumerate(agree)]
        merged = sum_in_order((d * e for d, e in zip(deltas, erased)), b)
        divisor = sum_in_order(erased, b).clamp_(min=1e-6)
        return b + merged.div_(divisor)

    return in_blocks(erase_and_merge, base, inputs)


def sce(call: TensorGroupCall) -> torch.Tensor:
    return checked("sce", sce_tensor(call.tensors[call.base], [call.tensors[k] for k in call.non_base],
                                     call.params["select_topk"], call.params["int8_mask"]))


# ----------------------------------------------------------------------------------------------
# ram, ramplus_tl


def ram_tensor(base: torch.Tensor, others: list[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """RAM (Reinforced Agent Merging, arXiv 2601.13572), mergekit 0.1.5: per entry, of the task vectors
    δ_i = x_i − b with |δ_i| > ε (c of them), y = b + δ_i when c = 1, b + Σ_i δ_i / c when c > 1, b when
    c = 0 (entries with |δ_i| ≤ ε are dropped), in the compute dtype. Elementwise (_ram_block)."""
    if not others:
        return base
    return in_blocks(lambda b, o: _ram_block(b, o, epsilon), base, others)   # cache-sized blocks, the same bits


def ramplus_tl_lambdas(shared: torch.Tensor, unique: torch.Tensor, r: float, alpha: float,
                       epsilon: float) -> torch.Tensor:
    """RAM+ (tensor-local) per-model scale of its unique entries, from ramplus_tl_piece_counts summed over the
    whole tensor: ρ_i = shared_i / max(unique_i, ε); λ_i = 1 + r·clamp(ρ_i, 0, α) (float32)."""
    return 1 + r * (shared / unique.clamp(min=epsilon)).clamp(min=0, max=alpha)


def ramplus_tl_tensor(base: torch.Tensor, others: list[torch.Tensor], r: float = 0.1, alpha: float = 0.2,
                      epsilon: float = 1e-5, lambdas: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RAM+ tensor-local (mergekit 0.1.5's ramplus_tl): RAM with each model's unique entries scaled by
    λ_i (ramplus_tl_lambdas of the whole tensor's counts): y = b + Σ_i λ_i δ_i [c = 1] + Σ_i δ_i [c > 1] / c.
    The λ_i are float32, so the result is float32 for bfloat16 / float16 inputs (as mergekit's).
    `lambdas`: the whole tensor's λ when this is a flat piece of it (the streamed form, same bits)."""
    if not others:
        return base

    if lambdas is None:
        lambdas = ramplus_tl_lambdas(*ramplus_tl_piece_counts(base, others, epsilon), r, alpha, epsilon)
    # entrywise given λ: cache-sized blocks, the same bits
    return in_blocks(lambda b, o: _ram_block(b, o, epsilon, lambdas), base, others)


def _nonzero_counts(base: torch.Tensor, others: list[torch.Tensor], epsilon: float):
    """Per model δ_i = x_i − b and m_i = [|δ_i| > ε] (NumPy booleans, torch's comparison from the bit
    patterns: selection.magnitude_above), model by model (no stacked copy), and per entry the count c of
    models with m_i (uint8 up to 255 models)."""
    deltas = [x - base for x in others]
    if deltas[0].dtype in PATTERNS and deltas[0].device.type == "cpu":
        nonzero = [magnitude_above(delta, epsilon) for delta in deltas]
    else:
        nonzero = [(delta.abs() > epsilon).reshape(-1).cpu().numpy() for delta in deltas]
    counts = nonzero[0].astype(np.uint8 if len(others) < 256 else np.int64)
    for flags in nonzero[1:]:
        counts += flags
    return deltas, nonzero, counts


def _ram_block(base: torch.Tensor, others: list[torch.Tensor], epsilon: float,
               lambdas: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RAM (`lambdas` None) or RAM+ (each model's λ_i) on one block, with the bits of mergekit's stacked
    expression kept_i·[c = 1]·λ_i + kept_i·[c > 1] / max(c, 1) summed over the models (kept_i = δ_i·m_i,
    m_i = [|δ_i| > ε]), in fewer single-dtype passes. Per entry one case holds: c = 0 (every term is ±0),
    c = 1 (the model's term is δ_i·λ_i, the others ±0) or c > 1 (the counted models' terms are δ_i / c in
    the compute dtype; the others ±0). So a term is float(δ_i / max(c, 1))·t_i with t_i = m_i·(u·λ_i +
    (1 − u)), u = [c = 1] (exactly 0, 1 or λ_i: the product rounds once, as mergekit's, and a zero t_i gives
    ±0, which leaves a nonzero sum as it is); torch's sum over the models starts from +0 and accumulates in
    float32 (also for bfloat16 / float16) in model order, so +0 + term_0 + term_1 + … (addcmul) has its bits.
    RAM then rounds that sum to the compute dtype and adds it to b there; RAM+ adds b to it in float32."""
    deltas, nonzero, counts = _nonzero_counts(base, others, epsilon)
    wide = torch.promote_types(base.dtype, torch.float32 if lambdas is None else lambdas.dtype)
    device = base.device

    def mask(flags: np.ndarray) -> torch.Tensor:
        return as_mask(torch.from_numpy(flags), wide).to(device).view(base.shape)

    if lambdas is not None:
        unique = mask(counts == 1)
        not_unique = torch.sub(1, unique)
    divisor = torch.from_numpy(np.maximum(counts, 1)).to(device=device, dtype=base.dtype).view(base.shape)
    merged = torch.zeros(base.shape, dtype=wide, device=device)
    for index, (delta, flags) in enumerate(zip(deltas, nonzero)):
        scale = mask(flags) if lambdas is None else \
            torch.add(not_unique, unique, alpha=float(lambdas[index])).mul_(mask(flags))
        merged.addcmul_(torch.div(delta, divisor).to(wide), scale)
    if lambdas is None:
        return base + merged.to(base.dtype)
    return base.to(wide) + merged


def ramplus_tl_piece_counts(base: torch.Tensor, others: list[torch.Tensor],
                            epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per model i (int64): the entries of this piece (or whole tensor) where |δ_i| > ε and c > 1 (shared),
    and where it is the only one (unique). Integers: summing them over flat pieces in any order gives the
    whole tensor's counts (the streamed statistics pass)."""
    _, nonzero, counts = _nonzero_counts(base, others, epsilon)
    overlap, unique = counts > 1, counts == 1
    return (torch.tensor([int(np.count_nonzero(flags & overlap)) for flags in nonzero]),
            torch.tensor([int(np.count_nonzero(flags & unique)) for flags in nonzero]))


def ram(call: TensorGroupCall) -> torch.Tensor:
    return checked("ram", ram_tensor(call.tensors[call.base], [call.tensors[k] for k in call.non_base],
                                     call.params["epsilon"]))


def ramplus_tl(call: TensorGroupCall) -> torch.Tensor:
    p = call.params
    return checked("ramplus_tl", ramplus_tl_tensor(call.tensors[call.base], [call.tensors[k] for k in call.non_base],
                                                   p["r"], p["alpha"], p["epsilon"], call.piece_coefficients))


# ----------------------------------------------------------------------------------------------
# arcee_fusion

QUANTILE_SAMPLE_SIZE = 1_000_000   # mergekit samples larger tensors; we take exact order statistics


ROWS = 256   # rows per block: every operation below is row-local, so blocks give the whole tensor's bits


def _row_blocks(x: torch.Tensor):
    rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    return [slice(start, start + ROWS) for start in range(0, rows.shape[0], ROWS)], rows


def arcee_fusion_importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Importance |x − b| · KL(p ‖ q) with p = softmax(x) + 1e-8, q = softmax(b) + 1e-8 along the last axis
    (one KL per row, Σ p log(p/q)); computed in blocks of rows (a few rows of temporaries)."""
    blocks, x_rows = _row_blocks(x)
    _, b_rows = _row_blocks(base)
    out = torch.empty_like(x_rows)
    for block in blocks:
        p = F.softmax(x_rows[block], dim=-1) + 1e-8
        q = F.softmax(b_rows[block], dim=-1) + 1e-8
        out[block] = (x_rows[block] - b_rows[block]).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return out.view(x.shape)


def fusion_quartiles(importance: torch.Tensor) -> torch.Tensor:
    """(q1, median, q3) of the flattened importance: the values at sorted positions ⌊q·(n − 1)⌋ for
    q = 0.25, 0.5, 0.75 (q·(n − 1) in float32, as mergekit). n ≤ 10^6: mergekit's own sort. Larger:
    mergekit sorts 10^6 entries drawn with replacement from torch's global RNG, so its quartiles are
    estimates that depend on every earlier draw of the run; we take the exact order statistics instead."""
    flat = importance.reshape(-1)
    positions = (torch.tensor([0.25, 0.5, 0.75]) * (flat.numel() - 1)).long()
    if flat.numel() <= QUANTILE_SAMPLE_SIZE:
        return torch.sort(flat)[0][positions.to(flat.device)]
    values = signed_order_statistics(flat, [int(position) + 1 for position in positions])
    return torch.tensor(values, dtype=flat.dtype, device=flat.device)


def arcee_fusion_tensor(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion (mergekit 0.1.5): importance s = arcee_fusion_importance(x, b); threshold
    τ = median(s) + 1.5·(q3(s) − q1(s)) (fusion_quartiles, in the compute dtype); y = b + (x − b)·[s ≥ τ]
    with the mask in float32 (so the result is float32 for bfloat16 / float16 inputs, as mergekit's)."""
    importance = arcee_fusion_importance(other, base)
    q1, median, q3 = fusion_quartiles(importance)
    threshold = median + 1.5 * (q3 - q1)
    blocks, b_rows = _row_blocks(base)
    _, x_rows = _row_blocks(other)
    _, s_rows = _row_blocks(importance)
    wide = torch.promote_types(base.dtype, torch.float32)
    out = torch.empty(b_rows.shape, dtype=wide, device=base.device)
    for block in blocks:      # elementwise from here: b + (x − b)·mask, block by block
        # mergekit: b + (x − b) · mask with x − b in the compute dtype and a float32 mask, i.e. float(b) +
        # float(x − b)·m; (x − b)·m is exact (m ∈ {0, 1}), so one fused addcmul in float32 has its bits (±0
        # included) without the mixed-dtype products and sums, which cost 4× more
        mask = as_mask(s_rows[block] >= threshold, wide)
        torch.addcmul(b_rows[block].to(wide), (x_rows[block] - b_rows[block]).to(wide), mask, out=out[block])
    return out.view(base.shape)


def arcee_fusion(call: TensorGroupCall) -> torch.Tensor:
    return checked("arcee_fusion", arcee_fusion_tensor(call.tensors[call.base], call.tensors[call.non_base[0]]))


__all__ = ["arcee_fusion", "arcee_fusion_importance", "arcee_fusion_tensor", "fusion_quartiles", "ram",
           "ram_tensor", "ramplus_tl", "ramplus_tl_lambdas", "ramplus_tl_piece_counts", "ramplus_tl_tensor", "sce", "sce_select_mask",
           "sce_tensor", "sce_weights", "sce_weights_of", "QUANTILE_SAMPLE_SIZE"]
