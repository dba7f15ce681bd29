"""Exact radix selection of |x| over streamed pieces (model_merging_methods/selection.py) and its users."""
import pytest
import numpy as np
import torch

import merge_models
from model_merging_methods import (DareOptions, RadixSelect, count_at_least, count_below, high_counts, kth_largest,
                                   kth_smallest, kth_smallest_pieces, low_counts, merge_state_dicts, MergeOptions,
                                   smallest_mask, trim_threshold)
from model_merging_methods.selection import pieces_of
from utils.engine.reader import CheckpointReader


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _cases():
    g = _generator()
    n = 30_011
    weights = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    tuned = (weights.float() + torch.randn(n, generator=g) * 1e-3).to(torch.bfloat16)
    with_zeros = torch.randn(n, generator=g)
    with_zeros[::3] = 0.0
    with_zeros[1::7] = -0.0
    denormals = torch.randn(n, generator=g) * 1e-39            # below float32's smallest normal 1.2e-38
    denormals[::5] = torch.finfo(torch.float32).tiny
    return {
        "float32": torch.randn(n, generator=g),
        "bf16 delta": tuned.float() - weights.float(),          # general float32 magnitudes, many ties
        "bf16 values": torch.randn(n, generator=g).to(torch.bfloat16),
        "many ties": torch.randint(-3, 4, (n,), generator=g).float() * 0.25,
        "zeros": with_zeros,
        "denormals": denormals,
        "wide range": torch.randn(n, generator=g) * torch.logspace(-30, 30, n),
        "all equal": torch.full((n,), -0.7),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_kth_smallest_matches_kthvalue_and_sort(case):
    values = _cases()[case]
    magnitudes = values.float().abs()
    ordered = magnitudes.sort().values
    n = values.numel()
    for k in [1, 2, 3, n // 3, n // 2, n - 1, n]:
        expected = torch.kthvalue(magnitudes, k).values.item()
        assert expected == ordered[k - 1].item()
        assert kth_smallest(values, k) == expected, (case, k)
        assert kth_largest(values, n - k + 1) == expected
        assert count_below(values, expected) < k <= count_below(values, expected) + int((magnitudes == expected).sum())
        assert count_at_least(values, expected) == n - count_below(values, expected)


@pytest.mark.parametrize("case", ["float32", "bf16 delta", "zeros", "denormals", "many ties"])
def test_pieces_of_any_size_give_the_same_value(case):
    values = _cases()[case]
    n = values.numel()
    for k in [1, n // 2 + 1, n]:
        found = {kth_smallest_pieces(pieces_of(values, size), k, n) for size in (997, 4096, n)}
        found.add(kth_smallest_pieces(lambda: [values[:5], values[5:17_000], values[17_000:]], k, n))
        assert found == {values.float().abs().sort().values[k - 1].item()}


def test_one_pass_for_bfloat16_values_two_for_general_float32():
    def passes(values, k):
        selection = RadixSelect(k, values.numel())
        for piece in pieces_of(values, 999)():
            selection.add_high(high_counts(piece))
        selection.finish_high()
        if not selection.needs_low_pass:
            return 1, selection.value
        for piece in pieces_of(values, 999)():
            selection.add_low(low_counts(piece, selection.high_bin))
        selection.finish_low()
        return 2, selection.value

    cases = _cases()
    bf16 = cases["bf16 values"]
    n = bf16.numel()
    for k in [1, n // 2, n]:
        assert passes(bf16, k) == (1, bf16.float().abs().sort().values[k - 1].item())
    general = cases["float32"]
    assert passes(general, n // 2) == (2, general.abs().sort().values[n // 2 - 1].item())


def test_radix_select_checks_its_inputs():
    with pytest.raises(ValueError, match="outside"):
        RadixSelect(0, 10)
    with pytest.raises(ValueError, match="outside"):
        RadixSelect(11, 10)
    selection = RadixSelect(3, 10)
    selection.add_high(high_counts(torch.ones(9)))
    with pytest.raises(ValueError, match="counted 9 values, expected 10"):
        selection.finish_high()
    with pytest.raises(RuntimeError, match="not finished"):
        RadixSelect(1, 1).value


def test_smallest_mask_is_a_stable_sort_prefix():
    """Exactly `count` entries, the smallest ones, ties at the threshold taken in index order."""
    magnitudes = torch.randint(0, 5, (10_007,), generator=_generator(3)).float() * 0.1
    for count in [0, 1, 2_000, 5_003, 10_006, 10_007]:
        expected = torch.zeros(10_007, dtype=torch.bool)
        expected[torch.sort(magnitudes, stable=True).indices[:count]] = True
        assert torch.equal(smallest_mask(magnitudes, count), expected)


def test_trim_threshold_and_global_trim_match_a_sort():
    g = _generator(4)
    delta = torch.randn(5_000, generator=g) * torch.rand(5_000, generator=g)
    for density in [0.0, 0.2, 0.5, 0.9999, 1.0]:
        k = int(5_000 * (1.0 - density))
        assert trim_threshold(delta, density) == (delta.abs().sort().values[k - 1].item() if k else 0.0)
    base = {"a": torch.zeros(3_000), "b": torch.zeros(40, 50)}
    model = {"a": torch.randn(3_000, generator=g), "b": torch.randn(40, 50, generator=g) * 3}
    merged = merge_state_dicts("ties_merging", base, [model], MergeOptions(density=0.3, ties_trim="global"))
    every = torch.cat([model["a"], model["b"].reshape(-1)])
    threshold = every.abs().sort().values[int(5_000 * 0.7) - 1]
    for name in base:
        assert torch.equal(merged[name], model[name] * (model[name].abs() >= threshold))


@pytest.mark.parametrize("extra, dare", [
    (["--density", "0.3"], None),
    (["--density", "0.2", "--drop_rate", "0.5"], DareOptions(drop_rate=0.5)),  # k > the zeros DARE made
    (["--density", "0.4", "--weight_format", "finetuned_weight", "--drop_rate", "0.2"],
     DareOptions(drop_rate=0.2, weight_format="finetuned_weight")),
])
def test_streamed_thresholds_match_in_memory_ties(llama_family, tmp_path, monkeypatch, extra, dare):
    """The engine's thresholds, counted over 100-element pieces in worker threads (two passes on these
    float32 deltas), give the merge that merge_state_dicts computes on whole tensors in memory."""
    import model_merging_methods.selection as selection
    import utils.engine.streaming as engine

    passes = []
    original = selection.low_counts
    monkeypatch.setattr(selection, "low_counts", lambda *a: passes.append(1) or original(*a))
    monkeypatch.setattr(engine, "PIECE", 100)
    args = ["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]),
            str(llama_family["ft1"]), "--method", "ties_merging", "--seed", "2", "--threads", "3",
            "--output_dir", str(tmp_path / "pieces"), "--no_progress"] + extra
    assert merge_models.main(args) == 0
    assert passes  # the low pass ran
    streamed = {n: CheckpointReader(tmp_path / "pieces").get(n) for n in CheckpointReader(tmp_path / "pieces").names()}
    readers = [CheckpointReader(llama_family[m]) for m in ("base", "ft0", "ft1")]
    states = [{n: r.get(n) for n in r.names()} for r in readers]
    in_memory = merge_state_dicts("ties_merging", states[0], states[1:], MergeOptions(density=float(extra[1])), dare=dare,
                                  seed=2)
    assert streamed.keys() == in_memory.keys()
    assert all(torch.equal(streamed[n], in_memory[n]) for n in streamed)


def test_streamed_l1_rescale_is_per_whole_tensor(llama_family, tmp_path, monkeypatch):
    """mergekit's l1 rescale multiplies by ||x||_1 / ||x̃||_1 of the whole tensor: a tensor cut into pieces
    must still get one factor, i.e. the streamed merge equals merge_state_dicts on whole tensors."""
    import utils.engine.streaming as engine

    monkeypatch.setattr(engine, "PIECE", 100)
    args = ["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]),
            str(llama_family["ft1"]), "--method", "task_arithmetic", "--drop_rate", "0.5", "--rescale_mode", "l1",
            "--seed", "4", "--threads", "3", "--output_dir", str(tmp_path / "l1"), "--no_progress"]
    assert merge_models.main(args) == 0
    reader = CheckpointReader(tmp_path / "l1")
    streamed = {n: reader.get(n) for n in reader.names()}
    readers = [CheckpointReader(llama_family[m]) for m in ("base", "ft0", "ft1")]
    states = [{n: r.get(n) for n in r.names()} for r in readers]
    in_memory = merge_state_dicts("task_arithmetic", states[0], states[1:], MergeOptions(),
                                  dare=DareOptions(drop_rate=0.5, rescale_mode="l1"), seed=4)
    assert all(torch.equal(streamed[n], in_memory[n]) for n in streamed)


def _stable_positions(magnitudes, descending):
    return torch.argsort(magnitudes, descending=descending, stable=True)


def _masks_by_pieces(rule, magnitudes, cuts):
    """Apply a KeepRule piece by piece, handing each piece the earlier pieces' tie counts."""
    totals, parts = [0] * len(rule.windows), []

    def offsets(counts):
        before = list(totals)
        totals[:] = [a + b for a, b in zip(totals, counts)]
        return before

    bounds = [0, *cuts, magnitudes.numel()]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        parts.append(rule.mask(magnitudes[start:stop], offsets))
    return torch.cat(parts)


@pytest.mark.parametrize("seed", range(6))
def test_keep_rules_equal_a_stable_sort_whole_and_in_pieces(seed):
    """top_k_rule / rank_window_rule keep exactly the positions a stable sort puts first / in the window,
    on data full of ties (bfloat16, rounded values, zeros), and pieces cut anywhere give the same mask."""
    from model_merging_methods.selection import rank_statistics, rank_window_rule, top_k_rule

    generator = torch.Generator().manual_seed(seed)
    for _ in range(40):
        n = int(torch.randint(1, 4000, (), generator=generator))
        x = torch.randn(n, generator=generator)
        x = [x.bfloat16(), torch.round(x * 3) / 3, torch.where(x > 0.5, x, 0.0)][seed % 3]
        magnitudes = x.abs().float()
        cuts = sorted(set(torch.randint(1, n, (3,), generator=generator).tolist())) if n > 1 else []
        k = int(torch.randint(1, n + 1, (), generator=generator))
        rule = top_k_rule(n, k, rank_statistics(x, [n - k + 1])[0])
        expected = torch.zeros(n, dtype=torch.bool)
        expected[_stable_positions(magnitudes, True)[:k]] = True
        assert torch.equal(rule.mask(magnitudes), expected)
        assert torch.equal(_masks_by_pieces(rule, magnitudes, cuts), expected)
        if x.dtype == torch.bfloat16:      # compared by bit pattern: x itself, whole and in pieces
            assert torch.equal(rule.mask_of(x), expected)
            assert torch.equal(_masks_by_pieces(rule, x, cuts), expected)
        first = int(torch.randint(0, n, (), generator=generator))
        count = int(torch.randint(1, n - first + 1, (), generator=generator))
        rule = rank_window_rule(first, count, *rank_statistics(x, [first + 1, first + count]))
        expected = torch.zeros(n, dtype=torch.bool)
        expected[_stable_positions(magnitudes, False)[first:first + count]] = True
        assert torch.equal(rule.mask(magnitudes), expected)
        assert torch.equal(_masks_by_pieces(rule, magnitudes, cuts), expected)
        if x.dtype == torch.bfloat16:
            assert torch.equal(rule.mask_of(x), expected)


def test_bfloat16_bit_pattern_comparisons_equal_float32_ones():
    """KeepRule's bfloat16 path compares bit patterns: the same booleans as comparing the float32 values with
    the bound rounded to float32, for bounds on and off the bfloat16 grid, zeros of either sign, subnormals,
    ±inf and negative bounds (NaN entries aside: their masked product is NaN either way)."""
    import operator

    import numpy as np

    from model_merging_methods.selection import _bfloat16_compare

    generator = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(5000, generator=generator) * 10.0 ** torch.randint(-40, 5, (5000,), generator=generator),
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, -1e-40, 3e38])]).bfloat16()
    patterns = x.view(torch.int16).numpy().view(np.uint16) & 0x7FFF
    magnitudes = x.abs().float().numpy()
    grid = [float(v) for v in x.abs().float()[:200]]
    bounds = grid + [np.nextafter(np.float32(v), np.float32(np.inf)).item() for v in grid] + [
        0.0, -0.0, -1.0, float("-inf"), float("inf"), 1e-45, 1e-39, 0.1, 1 / 3, 3.3e38, 1e39]
    for bound in bounds:
        with np.errstate(over="ignore"):             # (1e39 is +inf in float32, as torch rounds it)
            beta = np.float32(bound)
        for op in (operator.gt, operator.lt, operator.eq):
            assert np.array_equal(_bfloat16_compare(patterns, op, bound), op(magnitudes, beta)), (op, bound)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_signed_order_statistics_equal_a_sort(dtype):
    """Order statistics of values of any sign (arcee_fusion's quartiles) by radix selection on
    order-preserving keys: the values a sort puts at those positions, for sizes across piece cuts, ties,
    ±0 and small integer grids."""
    from model_merging_methods.selection import signed_order_statistics

    generator = torch.Generator().manual_seed(3)
    cases = [torch.randn(1, generator=generator), torch.randn(7, generator=generator),
             torch.randn(3_000_001, generator=generator), torch.tensor([-0.0, 0.0, 1.5, -1.5] * 1250),
             torch.randint(-3, 4, (4096,), generator=generator).float() * 1e-3]
    for values in cases:
        values = values.to(dtype)
        n = values.numel()
        ks = sorted({1, n, (n + 1) // 2, max(1, n // 4), max(1, 3 * n // 4)})
        ordered = values.float().sort().values
        assert signed_order_statistics(values, ks) == [float(ordered[k - 1]) for k in ks]
    with pytest.raises(ValueError, match="outside"):
        signed_order_statistics(torch.ones(3, dtype=dtype), [4])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_magnitude_above_equals_torchs_comparison(dtype):
    """|x| > bound from bit patterns gives torch's booleans for `x.abs() > bound` with a Python number:
    every 16-bit pattern (NaN, ±inf, ±0, subnormals), float32 across 12 decades, bounds on and off the
    dtype's grid, negative, zero, huge and infinite."""
    from model_merging_methods.selection import magnitude_above

    if dtype == torch.float32:
        generator = torch.Generator().manual_seed(4)
        values = torch.randn(200_000, generator=generator) * torch.logspace(-9, 3, 200_000)
        values = torch.cat([values, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-5])])
    else:
        values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    for bound in (1e-5, 1e-3, 0.0, -1.0, 1e-8, 0.5, 3.0, 1e30, float("inf")):
        assert np.array_equal(magnitude_above(values, bound), (values.abs() > bound).numpy()), bound
