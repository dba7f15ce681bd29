"""Closed-form values and invariants of every merge method on tiny tensors."""
import math

import pytest
import torch

from model_merging_methods import (DareOptions, MergeError, MergeOptions, available_methods, get_method,
                                   merge_state_dicts, slerp_tensor, task_vector, apply_task_vector)

BASE = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}
M1 = {"w": torch.tensor([2.0, 0.0, 1.5, 1.0])}   # δ1 = [ 1, -1, 0.5, 0]
M2 = {"w": torch.tensor([4.0, 1.5, 0.0, 1.0])}   # δ2 = [ 3, 0.5, -1, 0]


def test_task_vector_roundtrip():
    delta = task_vector(M1, BASE)
    assert torch.equal(delta["w"], torch.tensor([1.0, -1.0, 0.5, 0.0]))
    assert torch.equal(apply_task_vector(BASE, delta, 2.0)["w"], torch.tensor([3.0, -1.0, 2.0, 1.0]))


def test_average_merging_closed_form():
    merged = merge_state_dicts("average_merging", BASE, [M1, M2])
    assert torch.allclose(merged["w"], torch.tensor([3.0, 0.75, 0.75, 1.0]))
    weighted = merge_state_dicts("average_merging", None, [M1, M2], MergeOptions(weights=[3.0, 1.0]))
    assert torch.allclose(weighted["w"], (3 * M1["w"] + M2["w"]) / 4)


def test_task_arithmetic_closed_form():
    merged = merge_state_dicts("task_arithmetic", BASE, [M1, M2], MergeOptions(scaling_coefficient=0.5))
    assert torch.allclose(merged["w"], torch.tensor([3.0, 0.75, 0.75, 1.0]))  # λ = 1/K is the average
    weighted = merge_state_dicts("task_arithmetic", BASE, [M1, M2], MergeOptions(weights=[1.0, 2.0]))
    assert torch.allclose(weighted["w"], torch.tensor([1 + 1 + 6, 1 - 1 + 1, 1 + 0.5 - 2, 1.0]))


def test_ties_closed_form_count_and_weights():
    # δ1 = [1, -1, 0.5, 0], δ2 = [3, 0.5, -1, 0]; density 1 keeps all.
    # sums: [4, -0.5, -0.5, 0] → signs [+, -, -, majority]; majority over nonzero signs = sign(1-1-1) = -1
    # agreeing: c0 both (mean 2), c1 δ1 only (-1), c2 δ2 only (-1), c3 nobody (0).
    merged = merge_state_dicts("ties_merging", BASE, [M1, M2], MergeOptions(density=1.0))
    assert torch.allclose(merged["w"], torch.tensor([3.0, 0.0, 0.0, 1.0]))
    # mergekit normalisation by agreeing weights, w = [1, 3]: weighted sums [10, 0.5, -2.5, 0]
    # c0 (1·1 + 3·3)/4 = 2.5; c1 only δ2 agrees: 3·0.5/3 = 0.5; c2 only δ2: -1
    merged = merge_state_dicts("ties_merging", BASE, [M1, M2], MergeOptions(weights=[1.0, 3.0], ties_normalize="weights"))
    assert torch.allclose(merged["w"], torch.tensor([3.5, 1.5, 0.0, 1.0]))


def test_ties_trim_per_tensor_keeps_top_density():
    base = {"w": torch.zeros(4)}
    model = {"w": torch.tensor([0.1, -0.4, 0.3, -0.2])}
    # MergeLM's rule per tensor: k = int(4·0.5) = 2, keep |δ| ≥ 2nd smallest |δ| (0.2)
    merged = merge_state_dicts("ties_merging", base, [model], MergeOptions(density=0.5, scaling_coefficient=2.0))
    assert torch.allclose(merged["w"], torch.tensor([0.0, -0.8, 0.6, -0.4]))
    kept_all = merge_state_dicts("ties_merging", base, [model], MergeOptions(density=0.9))   # k = 0 keeps everything
    assert torch.allclose(kept_all["w"], model["w"])


def test_ties_zero_sum_sign_rules():
    base = {"a": torch.zeros(1), "b": torch.zeros(3)}
    models = [{"a": torch.tensor([1.0]), "b": torch.tensor([-1.0, -1.0, -1.0])},
              {"a": torch.tensor([-1.0]), "b": torch.tensor([-1.0, -1.0, -1.0])}]
    per_tensor = merge_state_dicts("ties_merging", base, models)
    assert per_tensor["a"].item() == 1.0                     # Σ = 0 elects +1 (mergekit's rule)
    global_trim = merge_state_dicts("ties_merging", base, models, MergeOptions(ties_trim="global"))
    assert global_trim["a"].item() == -1.0                    # the model-wide majority sign is −


def test_ties_global_zero_majority_elects_zero_as_mergelm():
    # δ1 = [1, 1, -2], δ2 = [-1, 1, -2]: Σ = [0, 2, -4] → signs [0, +, −]; Σ signs = 0, so MergeLM's
    # majority sign is torch.sign(0) = 0: coordinate 0 elects 0, nothing agrees, it merges to 0
    # (a +1 tie-break would keep δ1's 1 there).
    base = {"w": torch.zeros(3)}
    models = [{"w": torch.tensor([1.0, 1.0, -2.0])}, {"w": torch.tensor([-1.0, 1.0, -2.0])}]
    merged = merge_state_dicts("ties_merging", base, models, MergeOptions(ties_trim="global", density=1.0, scaling_coefficient=0.5))
    assert torch.equal(merged["w"], torch.tensor([0.0, 0.5, -1.0]))
    per_tensor = merge_state_dicts("ties_merging", base, models, MergeOptions(density=1.0, scaling_coefficient=0.5))
    assert torch.equal(per_tensor["w"], torch.tensor([0.5, 0.5, -1.0]))    # per tensor: Σ = 0 elects +1


def test_ties_global_trim_uses_whole_model_threshold():
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    model = {"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.3, 0.4])}
    # MergeLM: k = int(4·0.5) = 2, keep |δ| ≥ 2nd smallest (0.2) over the whole model
    merged = merge_state_dicts("ties_merging", base, [model], MergeOptions(density=0.5, ties_trim="global"))
    assert torch.allclose(merged["a"], torch.tensor([0.0, 0.2]))
    assert torch.allclose(merged["b"], torch.tensor([0.3, 0.4]))
    per_tensor = merge_state_dicts("ties_merging", base, [model], MergeOptions(density=0.5))  # k = 1 per tensor
    assert torch.allclose(per_tensor["a"], torch.tensor([0.1, 0.2]))


def test_ties_density_one_without_conflict_is_base_plus_lambda_mean():
    torch.manual_seed(0)
    base = {"w": torch.randn(50)}
    deltas = [torch.rand(50) + 0.1, torch.rand(50) + 0.1, torch.rand(50) + 0.1]
    models = [{"w": base["w"] + d} for d in deltas]
    merged = merge_state_dicts("ties_merging", base, models, MergeOptions(density=1.0, scaling_coefficient=0.7))
    assert torch.allclose(merged["w"], base["w"] + 0.7 * torch.stack(deltas).mean(0), atol=1e-6)


def test_slerp_closed_form_and_linear_fallback():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = slerp_tensor(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    near = torch.tensor([1.0, 0.001])
    assert torch.allclose(slerp_tensor(a, near, 0.25), torch.lerp(a, near, 0.25))
    merged = merge_state_dicts("slerp", {"w": a}, [{"w": b}], parameters={"t": 0.0})
    assert torch.allclose(merged["w"], a)


def test_fisher_merging_closed_form_and_normalisation():
    models = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
    fishers = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 2.0])}]
    merged = merge_state_dicts("fisher_merging", None, models, MergeOptions(fisher_eps=0.0), statistics=fishers)
    # c = 1/2 each: (1·1 + 3·3)/(1 + 3) = 2.5 and (2·2 + 2·6)/(2 + 2) = 4
    assert torch.allclose(merged["w"], torch.tensor([2.5, 4.0]))
    eps = 1e-6
    merged = merge_state_dicts("fisher_merging", None, models, MergeOptions(fisher_normalize=True),
                               statistics=fishers)
    norms = [math.sqrt(1 + 4), math.sqrt(9 + 4)]
    c = [1 / (n + eps) for n in norms]           # the common 1/2 and the normaliser cancel in the ratio
    for i, (f1, f2, x1, x2) in enumerate([(1, 3, 1, 3), (2, 2, 2, 6)]):
        expected = (c[0] * (f1 + eps) * x1 + c[1] * (f2 + eps) * x2) / (c[0] * (f1 + eps) + c[1] * (f2 + eps))
        assert merged["w"][i].item() == pytest.approx(expected, rel=1e-6)
    zero = [{"w": torch.zeros(2)}, {"w": torch.zeros(2)}]
    with pytest.raises(MergeError, match="merged tensor 'w' is Inf/NaN"):
        merge_state_dicts("fisher_merging", None, models, MergeOptions(fisher_eps=0.0), statistics=zero)


def test_regmean_closed_form():
    w1 = torch.tensor([[1.0, 0.0]])     # [out=1, in=2]
    w2 = torch.tensor([[0.0, 1.0]])
    g1 = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    g2 = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    merged = merge_state_dicts("regmean_merging", None, [{"l.weight": w1, "l.bias": torch.ones(1)},
                                                         {"l.weight": w2, "l.bias": torch.zeros(1)}],
                               statistics=[{"l.weight": g1}, {"l.weight": g2}])
    # each input dimension is seen by one model only, so each keeps its own column
    assert torch.allclose(merged["l.weight"], torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(merged["l.bias"], torch.tensor([0.5]))
    # identical Gram matrices reduce RegMean to the plain average
    g = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    merged = merge_state_dicts("regmean_merging", None, [{"l.weight": w1}, {"l.weight": w2}],
                               MergeOptions(regmean_alpha=0.5), statistics=[{"l.weight": g}, {"l.weight": g}])
    assert torch.allclose(merged["l.weight"], (w1 + w2) / 2, atol=1e-6)


def test_single_model_weight_one_returns_it():
    for method in ["average_merging", "task_arithmetic", "ties_merging"]:
        merged = merge_state_dicts(method, BASE, [M1], MergeOptions(weights=[1.0]))
        assert torch.allclose(merged["w"], M1["w"]), method


def test_excluded_and_non_float_tensors_come_from_base():
    base = {"encoder.w": torch.zeros(2), "classifier.w": torch.zeros(2), "ids": torch.arange(2)}
    model = {"encoder.w": torch.ones(2), "classifier.w": torch.ones(2), "ids": torch.arange(2)}
    merged = merge_state_dicts("task_arithmetic", base, [model, model], exclude_regex=[".*classifier.*"])
    assert torch.equal(merged["encoder.w"], torch.full((2,), 2.0))
    assert torch.equal(merged["classifier.w"], torch.zeros(2))
    assert torch.equal(merged["ids"], torch.arange(2))


def test_registry_lists_methods_with_papers_and_rejects_unknown():
    assert {"average_merging", "task_arithmetic", "ties_merging", "dare_linear", "dare_ties", "slerp",
            "fisher_merging", "regmean_merging", "linear", "ties"} <= set(available_methods())
    assert "2306.01708" in get_method("ties").paper
    with pytest.raises(MergeError, match="unknown merge method 'bogus'.*task_arithmetic"):
        merge_state_dicts("bogus", BASE, [M1])


@pytest.mark.parametrize("bad, message", [
    ({"w": torch.ones(3)}, "shape mismatch for 'w'"),
    ({"v": torch.ones(4)}, "'v' is in model 0 but not in base"),
    ({"w": torch.tensor([1.0, float("nan"), 0, 0])}, "'w' of model 0 contains NaN"),
])
def test_bad_inputs_name_the_tensor(bad, message):
    with pytest.raises(MergeError, match=message):
        merge_state_dicts("task_arithmetic", BASE, [bad])


@pytest.mark.parametrize("method, dare", [
    ("ties_merging", None), ("ties_merging", DareOptions(drop_rate=0.5)), ("average_merging", None),
    ("task_arithmetic", DareOptions(drop_rate=0.5, strategy="magnitude")), ("ties", {"weight": 1.0, "density": 0.3}),
    ("dare_ties", {"weight": 1.0, "density": 0.3}), ("slerp", {"t": 0.5}),
])
def test_nan_in_any_model_is_reported_whatever_the_method_would_drop(method, dare):
    base = {"w": torch.zeros(10)}
    model = {"w": torch.ones(10)}
    model["w"][3] = float("nan")
    with pytest.raises(MergeError, match="'w' of model 0 contains NaN"):
        if isinstance(dare, dict):     # mergekit's methods take recipe parameters
            merge_state_dicts(method, base, [model], parameters=dare)
        else:
            merge_state_dicts(method, base, [model], MergeOptions(density=0.3), dare=dare)


def test_missing_tensor_and_bad_options():
    with pytest.raises(MergeError, match="'v' is missing from model 0"):
        merge_state_dicts("task_arithmetic", {"w": torch.ones(1), "v": torch.ones(1)}, [{"w": torch.ones(1)}])
    with pytest.raises(MergeError, match="needs a base"):
        merge_state_dicts("task_arithmetic", None, [M1])
    with pytest.raises(MergeError, match="takes 1..1 models"):
        merge_state_dicts("slerp", BASE, [M1, M2], parameters={"t": 0.5})
    with pytest.raises(MergeError, match="outside \\[0, 1\\)"):
        merge_state_dicts("task_arithmetic", BASE, [M1], dare=DareOptions(drop_rate=1.0))
    with pytest.raises(MergeError, match="density 1.5"):
        merge_state_dicts("ties_merging", BASE, [M1], MergeOptions(density=1.5))


def test_excluded_heads_may_differ_in_shape_and_dare_state_dict_validates():
    from model_merging_methods import dare_state_dict

    base = {"encoder.w": torch.zeros(3), "classifier.weight": torch.zeros(2, 4)}
    sts = {"encoder.w": torch.ones(3), "classifier.weight": torch.ones(1, 4)}   # a 1-output (regression) head
    merged = merge_state_dicts("task_arithmetic", base, [sts], exclude_regex=["classifier.*"])
    assert torch.equal(merged["classifier.weight"], base["classifier.weight"])
    with pytest.raises(MergeError, match="shape mismatch for 'classifier.weight'"):
        merge_state_dicts("task_arithmetic", base, [sts])
    with pytest.raises(MergeError, match="'encoder.w' is in model 0 but not in base"):
        dare_state_dict(sts, {"classifier.weight": torch.zeros(1, 4)}, DareOptions(drop_rate=0.5))


def test_registry_says_which_options_need_the_whole_model():
    per_tensor, global_trim = MergeOptions(), MergeOptions(ties_trim="global")
    assert [name for name in ("ties_merging", "task_arithmetic", "fisher_merging")
            if get_method(name).needs_whole_model(global_trim)] == ["ties_merging", "fisher_merging"]
    assert [name for name in ("ties_merging", "regmean_merging", "fisher_merging")
            if get_method(name).needs_whole_model(per_tensor)] == ["fisher_merging"]
