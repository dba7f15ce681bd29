"""mergekit-semantics recipe methods on tiny tensors, checked against values computed by hand."""
import math

import pytest
import torch

from model_merging_methods import MergeError, get_method
from model_merging_methods.randomness import RandomSlot
from model_merging_methods.recipe_methods import (TensorGroupCall, gta_tensor, linear_tensor, model_stock_tensor,
                                                  nearswap_tensor, slerp_tensor, sparsify_della, sparsify_magnitude,
                                                  sparsify_outliers, sparsify_random)
from model_merging_methods.registry import REGISTRY

T = torch.tensor


def test_linear_normalized_weighted_mean_and_unnormalized_sum():
    a, b = T([1.0, 2.0]), T([3.0, 4.0])
    assert torch.equal(linear_tensor([a, b], [1.0, 3.0]), T([2.5, 3.5]))           # (1+9)/4, (2+12)/4
    assert torch.equal(linear_tensor([a, b], [1.0, 3.0], normalize=False), T([10.0, 14.0]))
    half = linear_tensor([a.bfloat16(), b.bfloat16()], [0.5, 0.5])
    assert half.dtype == torch.bfloat16 and torch.equal(half, T([2.0, 3.0]).bfloat16())


def test_slerp_orthogonal_vectors_follow_the_great_circle_and_colinear_ones_lerp():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    assert torch.allclose(slerp_tensor(a, b, 0.5), T([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-7)
    third = slerp_tensor(a, b, 1 / 3)                                                # angle π/6 from a
    assert torch.allclose(third, T([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)
    assert torch.equal(slerp_tensor(a, b, 0.0), a)
    c, d = T([1.0, 2.0]), T([1.01, 2.0])                                             # cos > 0.9995: lerp
    assert torch.allclose(slerp_tensor(c, d, 0.25), 0.75 * c + 0.25 * d, atol=0)


def test_ties_sign_election_and_disjoint_weighted_mean():
    base = T([0.0, 0.0, 0.0])
    x1, x2 = T([1.0, -2.0, 3.0]), T([-1.0, -1.0, 1.0])
    # Σ = [0, -3, 4] → signs [+, -, +]; x2[0] disagrees; mixed = [1, -3, 4], div = [1, 2, 2]
    merged = gta_tensor(base, [x1, x2], [1.0, 1.0], None, consensus=True, normalize=True)
    assert torch.equal(merged, T([1.0, -1.5, 2.0]))
    unnormalized = gta_tensor(base, [x1, x2], [1.0, 1.0], None, consensus=True, normalize=False, lam=0.5)
    assert torch.equal(unnormalized, T([0.5, -1.5, 2.0]))
    # task arithmetic: b + λ Σ w_i δ_i
    ta = gta_tensor(T([1.0, 1.0, 1.0]), [x1 + 1, x2 + 1], [0.5, 2.0], None, consensus=False, normalize=False)
    assert torch.equal(ta, T([1.0 + 0.5 - 2.0, 1.0 - 1.0 - 2.0, 1.0 + 1.5 + 2.0]))
    assert torch.equal(gta_tensor(base, [x1, x2], [1.0, 1.0], None, False, True, int8_mask=True),
                       gta_tensor(base, [x1, x2], [1.0, 1.0], None, False, True))


def test_magnitude_and_breadcrumbs_sparsification():
    delta = T([0.1, -3.0, 2.0, 0.5])
    assert torch.equal(sparsify_magnitude(delta, 0.5), T([0.0, -3.0, 2.0, 0.0]))
    # L1 rescale: kept entries scaled by Σ|δ| / Σ|kept| = 5.6 / 5
    assert torch.allclose(sparsify_magnitude(delta, 0.5, rescale=True), T([0.0, -3.0, 2.0, 0.0]) * (5.6 / 5.0))
    assert torch.equal(sparsify_magnitude(delta, 1.0), delta)
    assert torch.equal(sparsify_magnitude(delta, 0.0), torch.zeros(4))
    ten = torch.arange(1.0, 11.0)                                # keep 5, drop the top 1 and the bottom 4
    assert torch.equal(sparsify_outliers(ten, 0.5, 0.1), T([0, 0, 0, 0, 5.0, 6, 7, 8, 9, 0]))


def test_random_masks_depend_only_on_seed_input_and_tensor_name():
    delta = torch.randn(1000)
    slot = RandomSlot(3, 1, "model.layers.0.mlp.up_proj.weight")
    first, again = sparsify_random(delta, 0.3, slot), sparsify_random(delta, 0.3, slot)
    assert torch.equal(first, again)
    kept = (first != 0).float().mean().item()
    assert 0.22 < kept < 0.38
    other = sparsify_random(delta, 0.3, RandomSlot(4, 1, "model.layers.0.mlp.up_proj.weight"))
    assert not torch.equal(first, other)
    rescaled = sparsify_random(delta, 0.3, slot, rescale=True)
    assert torch.allclose(rescaled.abs().sum(), delta.abs().sum(), rtol=1e-5)    # mergekit's L1 match
    assert torch.equal(sparsify_random(delta, 1.0, slot), delta)


def test_della_keeps_large_entries_more_often_and_checks_epsilon():
    delta = torch.arange(1.0, 2001.0).reshape(2, 1000)
    pruned = sparsify_della(delta, 0.5, 0.4, RandomSlot(0, 0, "w"))
    kept = pruned != 0
    assert kept[:, 800:].float().mean() > 0.8 and kept[:, :200].float().mean() < 0.2
    with pytest.raises(MergeError, match="epsilon"):
        sparsify_della(delta, 0.5, 0.5, RandomSlot(0, 0, "w"))


def test_model_stock_interpolation_ratio():
    base = torch.zeros(4)
    same = T([1.0, 2.0, 0.0, 0.0])
    assert torch.allclose(model_stock_tensor(base, [same, same]), same)            # cos 1 → t = 1: the mean
    orthogonal = model_stock_tensor(base, [T([1.0, 0, 0, 0]), T([0, 1.0, 0, 0])])  # cos 0 → t = 0: the base
    assert torch.equal(orthogonal, base)
    a, b = T([1.0, 0.0]), T([0.5, math.sqrt(3) / 2])                               # cos 0.5 → t = 1/1.5
    t = 2 * 0.5 / (1 + 0.5)
    assert torch.allclose(model_stock_tensor(torch.zeros(2), [a, b]), t * (a + b) / 2, atol=1e-6)


def test_nearswap_swaps_close_entries():
    base, other = T([0.0, 0.0]), T([0.001, 1.0])
    # w = clamp(t / |b − x|, 0, 1) = [1, 0.01]
    assert torch.allclose(nearswap_tensor(base, other, 0.01), T([0.001, 0.01]))


def test_mergekit_names_carry_mergekit_defaults():
    assert get_method("ties").parameter("normalize").default is True
    assert get_method("dare_ties").parameter("rescale").default is True
    assert get_method("linear").parameter("weight").required
    assert get_method("della").parameter("epsilon").default == 0.15
    assert get_method("ties").name == "ties"                      # merge_models.py --method ties: mergekit's too
    assert set(REGISTRY) >= {"linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                             "passthrough", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                             "model_stock", "nearswap", "nuslerp", "multislerp", "karcher", "sce",
                             "arcee_fusion", "ram", "ramplus_tl"}
    with pytest.raises(MergeError, match="unknown merge method 'frankenmerge'"):
        get_method("frankenmerge")


def test_ties_method_through_the_registry_reads_per_input_parameters():
    ties = get_method("ties")
    call = TensorGroupCall({"b": T([0.0, 0.0]), "x": T([2.0, -1.0]), "y": T([1.0, 0.5])}, "b",
                           {"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False},
                           {"x": {"weight": 1.0, "density": 1.0}, "y": {"weight": 3.0, "density": 0.5}})
    # y keeps its largest entry: Δy = [3, 0]; Δx = [2, -1]; Σ = [5, -1] → signs [+, -];
    # agreeing: x everywhere, y at 0 only (a zero never agrees) → mixed [5, -1] / weights [4, 1]
    assert torch.equal(ties.implementation()(call), T([1.25, -1.0]))


def _gta_stacked(base, others, weights, consensus, normalize, lam):
    """mergekit's generalized task arithmetic written as it is there (a stack of the models' deltas and
    reductions over it): the reference that gta_tensor's per-model accumulation must match bit for bit."""
    deltas = torch.stack([other - base for other in others])
    w = torch.tensor(weights, dtype=deltas.dtype).unsqueeze(-1)
    deltas = deltas * w
    if consensus:
        signs = deltas.sign().to(base.dtype)
        mask = signs == (deltas.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
        mixed, divisor = (deltas * mask).sum(dim=0), (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(dim=0), w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_gta_accumulation_per_model_is_bitwise_the_stacked_reduction(dtype):
    generator = torch.Generator().manual_seed(7)
    n = 200_000
    base = (torch.randn(n, generator=generator) * 0.02).to(dtype)
    base[::11] = 0.0
    base[5::11] = -0.0
    for models in (2, 3, 5):
        others = [(base.double() + torch.randn(n, generator=generator, dtype=torch.float64) * 1e-3).to(dtype)
                  for _ in range(models)]
        for other in others:
            other[::3] = base[::3]                      # zero deltas: no sign, never agree
        weights = [0.7, -0.3, 1.3, 0.5, 0.2][:models]
        for consensus in (True, False):
            for normalize, lam in ((True, 1.0), (False, 0.8)):
                got = gta_tensor(base, others, weights, None, consensus, normalize, lam)
                want = _gta_stacked(base, others, weights, consensus, normalize, lam)
                assert got.dtype == dtype
                assert torch.equal(_bits(got), _bits(want)), (models, consensus, normalize)


def _bits(tensor):
    """The bit patterns (so that −0 and +0 differ)."""
    return tensor.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def test_random_keep_compares_draws_as_torch_does():
    """DARE keep masks come from RandomSlot.below, which compares the generator's bits: the same booleans as
    torch's `u < density` on uniform()'s float32 draws (the density rounded to float32), also for densities
    next to a draw value, at every offset of a piece that starts and ends inside a segment."""
    import numpy as np

    from model_merging_methods import SEGMENT
    from model_merging_methods.recipe_methods import _random_keep

    total = SEGMENT + 1001
    slot = RandomSlot(3, 1, "w", 0, total)
    draws = slot.uniform(total)
    value = float(draws[12345])                      # a draw value: the cut-off falls exactly on it
    for density in (value, value + 1e-12, value - 1e-12, np.nextafter(np.float32(value), 1), 0.3, 0.30000001,
                    0.5, 1e-9, 1.0, 0.0):
        expected = (draws < density).numpy()
        assert np.array_equal(slot.below(total, density), expected), density
        assert np.array_equal(_random_keep(draws, slot, density), expected), density
        for start, stop in ((7, 8), (3, SEGMENT + 5), (SEGMENT - 3, SEGMENT + 2), (SEGMENT + 1, total)):
            piece = RandomSlot(3, 1, "w", start, total)
            assert np.array_equal(piece.below(stop - start, density), expected[start:stop]), (density, start)
    # the case that tells float32 from float64 comparison: the draw equal to `value` is not below it in float32
    assert int((draws.double() < value + 1e-12).sum()) > int((draws < value + 1e-12).sum())
