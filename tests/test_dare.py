"""DARE: the paper's drop-and-rescale, its variants, exact magnitude counts and seed determinism."""
import subprocess
import sys

import pytest
import torch

from model_merging_methods import (DareOptions, MergeError, dare_state_dict, dare_tensor, kth_smallest,
                                   RandomSlot, SEGMENT, merge_state_dicts, smallest_mask)


def _generator(seed=0):
    return RandomSlot(seed, 0, "t")


def _dare(p, **options):
    """One model's resolved DARE setting (DareOptions.resolve validates it)."""
    return DareOptions(drop_rate=p, **options).resolve(1)[0]


def test_rate_zero_is_identity():
    torch.manual_seed(0)
    base = {"a": torch.randn(5, 5), "b": torch.randn(3)}
    fine = {n: t + 0.1 for n, t in base.items()}
    out = dare_state_dict(fine, base, DareOptions(drop_rate=0.0))
    for name in base:
        assert torch.equal(out[name], fine[name])


def test_kept_entries_are_rescaled_by_one_over_one_minus_p():
    x = torch.arange(1.0, 1001.0)
    out, kept = dare_tensor(x, _dare(0.3), _generator())
    survivors = out != 0
    assert kept == int(survivors.sum())
    assert torch.allclose(out[survivors], x[survivors] / 0.7)
    assert 0.6 < kept / 1000 < 0.8
    drop_only, _ = dare_tensor(x, _dare(0.3, rescale=False), _generator())
    assert torch.equal(drop_only[survivors], x[survivors])      # same mask, no rescale


def test_mean_over_seeds_approaches_delta():
    delta = torch.linspace(-1, 1, 200)
    mean = torch.stack([dare_tensor(delta, _dare(0.5), RandomSlot(s, 0, "d"))[0]
                        for s in range(2000)]).mean(0)
    # E[x̂] = δ; per-entry std of the mean = |δ|·sqrt(p/(1−p)/n) ≤ 0.023
    assert (mean - delta).abs().max() < 0.1
    assert (mean - delta).abs().mean() < 0.02


def test_l1_rescale_matches_norm():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    out, _ = dare_tensor(x, _dare(0.8, rescale_mode="l1"), _generator())
    assert out.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-5)


def test_magnitude_drops_exact_count_even_with_ties():
    x = torch.tensor([0.5, -0.1, 0.1, 0.1, 2.0, -0.1, 0.3, 0.1])
    out, kept = dare_tensor(x, _dare(0.5, strategy="magnitude", rescale=False), _generator())
    assert kept == 4                 # int(8·0.5) = 4 dropped among the five |x| = 0.1 ties, by index
    assert torch.equal(out.abs(), torch.tensor([0.5, 0, 0, 0, 2.0, 0, 0.3, 0.1]))
    out, kept = dare_tensor(x, _dare(0.25, strategy="magnitude", rescale=False), _generator())
    assert kept == 6                                 # 2 of the five 0.1-ties dropped: the first two by index
    assert torch.equal(out.abs(), torch.tensor([0.5, 0, 0, 0.1, 2.0, 0.1, 0.3, 0.1]))


def test_magnitude_original_rule_drops_every_tie_at_the_threshold():
    # MergeLM: k = int(n·p), t = k-th smallest |x|, drop every |x| ≤ t. Five |x| = 0.1 ties: all go.
    x = torch.tensor([0.5, -0.1, 0.1, 0.1, 2.0, -0.1, 0.3, 0.1])
    for p in (0.25, 0.5):
        out, kept = dare_tensor(x, _dare(p, strategy="magnitude", rescale=False, magnitude_rule="original"), _generator())
        assert kept == 3 and torch.equal(out, torch.tensor([0.5, 0, 0, 0, 2.0, 0, 0.3, 0]))
    out, kept = dare_tensor(x, _dare(0.5, strategy="magnitude", magnitude_rule="original"), _generator())
    assert torch.equal(out, torch.tensor([1.0, 0, 0, 0, 4.0, 0, 0.6, 0]))          # rescaled by 1/(1 − p)
    out, kept = dare_tensor(x[:3], _dare(0.2, strategy="magnitude", magnitude_rule="original"), _generator())
    assert kept == 3 and torch.equal(out, x[:3] / 0.8)                             # k = 0: nothing dropped
    with pytest.raises(MergeError, match="unknown magnitude_rule 'exact'"):
        DareOptions(drop_rate=0.5, magnitude_rule="exact").resolve(1)


def test_magnitude_rule_flag_reaches_dare_options():
    import argparse

    from utils.cli import add_dare_arguments, dare_options_from_args, dare_suffix

    parser = argparse.ArgumentParser()
    add_dare_arguments(parser)
    options = dare_options_from_args(parser.parse_args(["--weight_mask_rate", "0.5", "--mask_strategy", "magnitude",
                                                        "--magnitude_rule", "original"]))
    assert options.magnitude_rule == "original" and options.strategy == "magnitude"
    assert dare_suffix(options) == "_mask_0.5_rescale_False_strategy_magnitude_magnitude_rule_original"
    assert dare_options_from_args(parser.parse_args([])).magnitude_rule == "exact_count"


def test_magnitude_count_below_one_keeps_everything():
    x = torch.tensor([1.0, 2.0, 3.0])
    out, kept = dare_tensor(x, _dare(0.2, strategy="magnitude", rescale=False), _generator())
    assert kept == 3 and torch.equal(out, x)


def test_kth_smallest_matches_sort():
    values = torch.randn(100_000, generator=torch.Generator().manual_seed(1)).abs()
    ordered = values.sort().values
    for k in [1, 2, 777, 50_000, 99_999, 100_000]:
        assert kth_smallest(values, k) == ordered[k - 1].item()
    mask = smallest_mask(values, 12_345)
    assert int(mask.sum()) == 12_345 and values[mask].max() <= values[~mask].min()


def test_finetuned_weight_format_masks_the_weights_themselves():
    base = {"w": torch.full((1000,), 5.0)}
    fine = {"w": torch.full((1000,), 6.0)}
    out = dare_state_dict(fine, base, DareOptions(drop_rate=0.5, weight_format="finetuned_weight"))["w"]
    assert set(out.unique().tolist()) == {0.0, 12.0}
    delta = dare_state_dict(fine, base, DareOptions(drop_rate=0.5))["w"]
    assert set(delta.unique().tolist()) == {5.0, 7.0}


def test_same_seed_same_masks_in_any_tensor_order_and_subset():
    torch.manual_seed(0)
    base = {f"t{i}": torch.randn(64, 8) for i in range(5)}
    models = [{n: t + 0.1 * torch.randn_like(t) for n, t in base.items()} for _ in range(2)]
    dare = DareOptions(drop_rate=0.7)
    full = merge_state_dicts("task_arithmetic", base, models, dare=dare, seed=11)
    reversed_names = list(reversed(list(base)))
    rev = merge_state_dicts("task_arithmetic", {n: base[n] for n in reversed_names},
                            [{n: m[n] for n in reversed_names} for m in models], dare=dare, seed=11)
    single = merge_state_dicts("task_arithmetic", {"t3": base["t3"]}, [{"t3": m["t3"]} for m in models],
                               dare=dare, seed=11)
    for name in base:
        assert torch.equal(full[name], rev[name])
    assert torch.equal(full["t3"], single["t3"])
    other = merge_state_dicts("task_arithmetic", base, models, dare=dare, seed=12)
    assert not torch.equal(full["t0"], other["t0"])


def test_masks_do_not_depend_on_thread_count():
    code = ("import torch, hashlib; torch.set_num_threads({n});"
            "from model_merging_methods import DareOptions, dare_tensor, RandomSlot;"
            "x = torch.linspace(-1, 1, 3_000_000);"
            "y, _ = dare_tensor(x, DareOptions(drop_rate=0.9).resolve(1)[0], RandomSlot(5, 1, 'layer.weight'));"
            "print(hashlib.sha256(y.numpy().tobytes()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code.format(n=n)], capture_output=True, text=True,
                              check=True).stdout for n in (1, 2)}
    assert len(digests) == 1


def test_per_model_rates_and_bad_rates():
    base = {"w": torch.zeros(10_000)}
    models = [{"w": torch.ones(10_000)}, {"w": torch.ones(10_000)}]
    report = []
    merge_state_dicts("average_merging", base, models, dare=DareOptions(drop_rate=[0.1, 0.9]), report=report)
    assert 0.88 < report[0]["w"] < 0.92 and 0.08 < report[1]["w"] < 0.12
    for bad in (1.0, -0.1):
        with pytest.raises(MergeError, match=f"drop rate {bad} for model 0 is outside"):
            merge_state_dicts("average_merging", base, models, dare=DareOptions(drop_rate=bad))
    with pytest.raises(MergeError, match="2 values for 3 models|3 models"):
        merge_state_dicts("average_merging", base, models + models[:1], dare=DareOptions(drop_rate=[0.1, 0.2]))


def test_pieces_draw_the_same_mask_as_the_whole_tensor():
    total = 3 * SEGMENT + 12_345
    x = torch.linspace(-1, 1, total)
    whole, _ = dare_tensor(x, _dare(0.6), RandomSlot(9, 2, "w"))
    bounds = [0, SEGMENT, 3 * SEGMENT, total]           # segment-aligned pieces, as the engine streams
    pieces = [dare_tensor(x[a:b], _dare(0.6), RandomSlot(9, 2, "w", a, total))[0]
              for a, b in zip(bounds, bounds[1:])]
    assert torch.equal(torch.cat(pieces), whole)
    odd = dare_tensor(x[100:SEGMENT + 50], _dare(0.6), RandomSlot(9, 2, "w", 100, total))[0]
    assert torch.equal(odd, whole[100:SEGMENT + 50])   # unaligned pieces too


def test_options_resolve_once_to_one_validated_setting_per_model():
    resolved = DareOptions(drop_rate=[0.1, 0.4], strategy="magnitude").resolve(2)
    assert [d.drop_rate for d in resolved] == [0.1, 0.4]
    assert {(d.strategy, d.rescale, d.weight_format, d.rescale_mode) for d in resolved} == {
        ("magnitude", True, "delta_weight", "paper")}
    assert [d.drop_rate for d in DareOptions(drop_rate=0.3).resolve(3)] == [0.3, 0.3, 0.3]
    with pytest.raises(MergeError, match="unknown mask_strategy 'lottery'"):
        DareOptions(strategy="lottery").resolve(1)
    with pytest.raises(MergeError, match="drop rate 1.0 for model 1 is outside"):
        DareOptions(drop_rate=[0.5, 1.0]).resolve(2)


def test_dare_resolution_drops_all_zero_rates():
    from model_merging_methods import MergeOptions, get_method, resolve_dare

    dare, _ = resolve_dare(get_method("ties_merging"), MergeOptions(density=0.5), DareOptions(drop_rate=0.2), 2)
    assert [d.drop_rate for d in dare] == [0.2, 0.2]
    dare, options = resolve_dare(get_method("ties_merging"), MergeOptions(density=0.5), DareOptions(), 2)
    assert dare is None and options.density == 0.5                   # rate 0 everywhere: no DARE at all


def test_drop_settings_from_one_load_match_single_calls_and_skip_identical_ones():
    """utils/glue/dropping.py: each setting's weights are those of dare_state_dict on the kept fine-tuned
    state; rate 0 and magnitude settings that differ only in the seed are evaluated once."""
    from model_merging_methods import dare_state_dict
    from utils.glue.dropping import drop_settings, evaluate_drop_settings

    torch.manual_seed(0)
    base = {"layer.weight": torch.randn(6, 5), "classifier.weight": torch.randn(2, 5)}
    finetuned = {name: tensor + 0.1 * torch.randn_like(tensor) for name, tensor in base.items()}
    model = torch.nn.Module()
    model.layer, model.classifier = torch.nn.Linear(5, 6, bias=False), torch.nn.Linear(5, 2, bias=False)
    model.load_state_dict(finetuned)
    calls = []

    def evaluate(m):
        calls.append(1)
        return {name: tensor.clone() for name, tensor in m.state_dict().items()}

    for strategy, expected_calls in (("random", 5), ("magnitude", 3)):  # rate 0 once; magnitude once per rate
        calls.clear()
        settings = drop_settings([0.0, 0.3, 0.8], [0, 1], rescale=True, strategy=strategy, weight_format="delta_weight")
        results = list(evaluate_drop_settings(model, base, settings, evaluate, [".*classifier.*"]))
        assert len(results) == 6 and len(calls) == expected_calls
        for setting, state in results:
            expected = finetuned if setting.options.drop_rate == 0.0 else dare_state_dict(
                finetuned, base, setting.options, seed=setting.seed, model_index=0, exclude_regex=[".*classifier.*"])
            assert all(torch.equal(state[name], expected[name]) for name in finetuned)
        assert torch.equal(results[2][1]["layer.weight"], results[3][1]["layer.weight"]) == (strategy == "magnitude")
        assert all(torch.equal(model.state_dict()[name], finetuned[name]) for name in finetuned)  # restored
