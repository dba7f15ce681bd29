"""mergekit 0.1.5's nuslerp, multislerp, karcher, sce, arcee_fusion, ram, ramplus_tl: closed-form values on
tiny tensors, invariants, dtype rules, streaming in pieces, recipes end to end and bad input.

Bit-identity with mergekit itself is checked by scripts/compare_mergekit_kernels.py and
scripts/compare_with_mergekit.py in mergekit's own environment (figures in docs/methods.md); these tests need
no mergekit."""
import math

import pytest
import torch

from model_merging_methods import mergekit_consensus as mc
from model_merging_methods import mergekit_spherical as ms
from model_merging_methods.options import MergeError
from model_merging_methods.recipe_methods import TensorGroupCall
from model_merging_methods.registry import get_method

D = torch.float64


def e(i, n=3):
    v = torch.zeros(n, dtype=D)
    v[i] = 1
    return v


# ----------------------------------------------------------------------------------------------
# nuslerp


def test_nuslerp_t_from_weights_and_orthogonal_slerp():
    assert ms.nuslerp_t([1.0, 3.0]) == 0.75 and ms.nuslerp_t([1.0, -1.0]) == 0.5
    y = ms.nuslerp_tensor([e(0), 2 * e(1)], [1.0, 3.0])       # θ = π/2, sin θ = 1: the raw vectors are mixed
    expected = math.sin(0.25 * math.pi / 2) * e(0) + math.sin(0.75 * math.pi / 2) * 2 * e(1)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-15)


def test_nuslerp_colinear_is_linear_and_base_takes_task_vectors():
    a = torch.tensor([1.0, 2.0, -1.0], dtype=D)
    torch.testing.assert_close(ms.nuslerp_tensor([a, 3 * a], [0.5, 0.5]), 2 * a)
    base = torch.tensor([5.0, -3.0, 0.5], dtype=D)
    with_base = ms.nuslerp_tensor([base + e(0), base + e(2)], [1.0, 1.0], base=base)
    torch.testing.assert_close(with_base, base + math.sin(math.pi / 4) * (e(0) + e(2)))


def test_nuslerp_per_row_and_per_column():
    rows0 = torch.stack([e(0), e(1)])
    rows1 = torch.stack([e(1), 4 * e(1)])            # row 0 orthogonal, row 1 colinear
    y = ms.nuslerp_tensor([rows0, rows1], [1.0, 1.0], flatten=False)
    torch.testing.assert_close(y[0], math.sin(math.pi / 4) * (e(0) + e(1)))
    torch.testing.assert_close(y[1], 2.5 * e(1))
    columns = ms.nuslerp_tensor([rows0.T.contiguous(), rows1.T.contiguous()], [1.0, 1.0], row_wise=True,
                                flatten=False)
    torch.testing.assert_close(columns, y.T)
    flat = ms.nuslerp_tensor([rows0, rows1], [1.0, 1.0])        # the default: one angle for the whole tensor
    assert not torch.allclose(flat, y)


# ----------------------------------------------------------------------------------------------
# multislerp


def test_multislerp_symmetric_orthogonal_inputs_give_the_normalised_mean():
    y = ms.multislerp_tensor([e(0), e(1)], [1.0, 1.0])
    torch.testing.assert_close(y, (e(0) + e(1)) / math.sqrt(2), rtol=0, atol=1e-7)
    same = torch.tensor([0.3, -1.2, 2.0], dtype=D)
    torch.testing.assert_close(ms.multislerp_tensor([same, same, same], [0.2, 0.3, 0.5]), same, rtol=0, atol=1e-7)
    assert ms.multislerp_tensor([same], [1.0]) is same


def test_multislerp_norm_is_the_weighted_mean_norm_and_base_is_added_back():
    base = torch.tensor([1.0, 1.0, 1.0], dtype=D)
    y = ms.multislerp_tensor([base + 2 * e(0), base + 4 * e(1)], [0.25, 0.75], base=base)
    assert abs(float((y - base).norm()) - (0.25 * 2 + 0.75 * 4)) < 1e-6


def test_multislerp_cancelling_inputs():
    a = torch.tensor([1.0, 2.0], dtype=D)
    torch.testing.assert_close(ms.multislerp_tensor([a, -a], [1.0, 1.0]), torch.zeros(2, dtype=D))  # linear
    with pytest.raises(MergeError, match="multislerp"):
        ms.multislerp_tensor([a, -a, a, -a], [1.0, 1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------------------
# karcher


def test_karcher_weighted_mean_of_two_orthogonal_directions_is_on_the_arc():
    """With weights 1/4, 3/4 the Karcher mean of e0, e1 lies at 3/4 of the arc (67.5°), not at the
    normalised Euclidean mean (71.6°): the iteration has to move it there."""
    y = ms.karcher_tensor([e(0), 3 * e(1)], [0.25, 0.75], max_iter=100, tol=1e-12)
    angle = 0.75 * math.pi / 2
    scale = 0.25 * 1 + 0.75 * 3
    torch.testing.assert_close(y, scale * (math.cos(angle) * e(0) + math.sin(angle) * e(1)), rtol=0, atol=1e-9)
    one_step = ms.karcher_tensor([e(0), 3 * e(1)], [0.25, 0.75], max_iter=0)
    assert abs(math.atan2(float(one_step[1]), float(one_step[0])) - math.atan(3)) < 1e-12


def test_karcher_equal_weights_identical_and_zero_inputs():
    x = torch.tensor([0.5, -2.0, 1.0], dtype=D)
    torch.testing.assert_close(ms.karcher_tensor([x, x, x]), x)
    assert torch.equal(ms.karcher_tensor([torch.zeros(3), torch.zeros(3)]), torch.zeros(3))
    # an input of norm ≤ tol is left out of the direction but its norm still counts in the scale
    y = ms.karcher_tensor([x, torch.zeros(3, dtype=D)])
    torch.testing.assert_close(y, 0.5 * x)


# ----------------------------------------------------------------------------------------------
# sce


def test_sce_closed_form():
    base = torch.zeros(3, dtype=D)
    d1, d2 = torch.tensor([1.0, -2.0, 3.0], dtype=D), torch.tensor([1.0, 1.0, -1.0], dtype=D)
    # weights 14/17, 3/17; elected signs (+, −, +); model 2 disagrees on entries 1 and 2
    torch.testing.assert_close(mc.sce_tensor(base, [d1, d2]), torch.tensor([1.0, -2.0, 3.0], dtype=D))
    # select_topk 0.5: of the 2 entries with non-zero variance (2.25, 4) keep int(2·0.5) = 1: entry 2
    torch.testing.assert_close(mc.sce_tensor(base, [d1, d2], select_topk=0.5), torch.tensor([0.0, 0.0, 3.0], dtype=D))
    assert torch.equal(mc.sce_tensor(base, [d1, d2], select_topk=0.34), base)      # int(2·0.34) = 0 entries
    torch.testing.assert_close(mc.sce_tensor(base, [d1, d2], select_topk=0.5, int8_mask=True),
                               mc.sce_tensor(base, [d1, d2], select_topk=0.5))
    weights = mc.sce_weights(torch.stack([d1, d2]))
    torch.testing.assert_close(weights, torch.tensor([14 / 17, 3 / 17], dtype=D))
    assert torch.equal(mc.sce_tensor(base, []), base)


# ----------------------------------------------------------------------------------------------
# ram, ramplus_tl


def test_ram_closed_form_and_epsilon():
    base = torch.full((5,), 10.0, dtype=D)
    d1 = torch.tensor([1.0, 0.0, 2.0, 0.0, 1e-6], dtype=D)
    d2 = torch.tensor([3.0, 0.0, 0.0, -4.0, 1e-6], dtype=D)
    y = mc.ram_tensor(base, [base + d1, base + d2])
    torch.testing.assert_close(y, base + torch.tensor([2.0, 0.0, 2.0, -4.0, 0.0], dtype=D))
    y = mc.ram_tensor(base, [base + d1, base + d2], epsilon=1.5)   # only |δ| > 1.5 counts
    torch.testing.assert_close(y, base + torch.tensor([3.0, 0.0, 2.0, -4.0, 0.0], dtype=D))


def test_ramplus_tl_scales_unique_entries_by_the_shared_to_unique_ratio():
    base = torch.zeros(4, dtype=D)
    d1 = torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=D)      # shared 1, unique 1 → ρ = 1
    d2 = torch.tensor([3.0, 0.0, -4.0, 6.0], dtype=D)     # shared 1, unique 2 → ρ = 0.5
    y = mc.ramplus_tl_tensor(base, [d1, d2], r=0.5, alpha=0.8)
    expected = torch.tensor([2.0, 2.0 * (1 + 0.5 * 0.8), -4.0 * 1.25, 6.0 * 1.25], dtype=D)
    torch.testing.assert_close(y, expected)
    low = mc.ramplus_tl_tensor(base, [d1, d2], r=0.5, alpha=0.2)     # ρ clamped to α
    torch.testing.assert_close(low, torch.tensor([2.0, 2.2, -4.4, 6.6], dtype=D))
    bf16 = mc.ramplus_tl_tensor(base.bfloat16(), [d1.bfloat16(), d2.bfloat16()])
    assert bf16.dtype == torch.float32                     # λ is float32, as in mergekit


def test_ramplus_tl_pieces_with_whole_tensor_lambdas_equal_the_whole_tensor():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=generator).bfloat16()
    others = [(base.float() + 0.01 * torch.randn(1000, generator=generator)
               * (torch.rand(1000, generator=generator) > 0.5)).bfloat16() for _ in range(3)]
    whole = mc.ramplus_tl_tensor(base, others, epsilon=1e-3)
    counts = [mc.ramplus_tl_piece_counts(base[s:s + 300], [o[s:s + 300] for o in others], 1e-3)
              for s in range(0, 1000, 300)]
    lambdas = mc.ramplus_tl_lambdas(sum(c[0] for c in counts), sum(c[1] for c in counts), 0.1, 0.2, 1e-3)
    pieces = torch.cat([mc.ramplus_tl_tensor(base[s:s + 300], [o[s:s + 300] for o in others], epsilon=1e-3,
                                             lambdas=lambdas) for s in range(0, 1000, 300)])
    assert torch.equal(whole, pieces)


def _ram_as_mergekit_writes_it(base, others, r, alpha, epsilon, plus=True):
    """mergekit 0.1.5's RAMPlusTLMergeTask (plus) / RAMMergeTask execute, transcribed: stacked task
    vectors, int64 counts."""
    task_vectors = torch.stack([x - base for x in others], dim=0).view(len(others), -1)
    nonzero = task_vectors.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    shared_i, unique_i = (nonzero & overlap).sum(dim=1), (nonzero & unique).sum(dim=1)
    lambdas = 1 + r * (shared_i / unique_i.clamp(min=epsilon)).clamp(min=0, max=alpha)
    kept = task_vectors * nonzero
    first = kept * unique * lambdas.unsqueeze(-1) if plus else kept * unique
    merged = (first + (kept * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("models", [1, 2, 3, 5])
@pytest.mark.parametrize("plus", [True, False])
def test_ram_and_ramplus_tl_single_dtype_passes_keep_mergekits_bits(dtype, models, plus):
    """The per-case rewrite (v_i·m_i summed from +0 in model order) equals mergekit's stacked expression bit
    for bit: entries with no, one and several counted models, deltas at ε, signed zeros in base and deltas,
    whole tensors and blocks (ELEMENTWISE_BLOCK cut)."""
    generator = torch.Generator().manual_seed(models)
    n = (1 << 17) + 77
    base = torch.randn(n, generator=generator).to(dtype)
    base[:6] = torch.tensor([-0.0, 0.0, -0.0, 0.0, -0.0, 1.0]).to(dtype)
    others = []
    for index in range(models):
        delta = 0.01 * torch.randn(n, generator=generator) * (torch.rand(n, generator=generator) > 0.4)
        delta[:6] = torch.tensor([-0.0, -0.0, 0.0, 1e-3, -1e-3, -0.0])
        other = (base.float() + delta).to(dtype)
        other[6 + index] = base[6 + index]                       # δ = 0 exactly
        others.append(other)
    for epsilon in (1e-5, 1e-3):
        expected = _ram_as_mergekit_writes_it(base, others, 0.3, 0.7, epsilon, plus)
        got = mc.ramplus_tl_tensor(base, others, r=0.3, alpha=0.7, epsilon=epsilon) if plus else \
            mc.ram_tensor(base, others, epsilon=epsilon)
        assert got.dtype == expected.dtype
        assert torch.equal(got.view(torch.int16 if got.itemsize == 2 else torch.int32),
                           expected.view(torch.int16 if expected.itemsize == 2 else torch.int32))


# ----------------------------------------------------------------------------------------------
# arcee_fusion


def test_arcee_fusion_keeps_entries_at_or_above_median_plus_1_5_iqr():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(8, 16, generator=generator, dtype=D)
    other = base + 0.1 * torch.randn(8, 16, generator=generator, dtype=D)
    y = mc.arcee_fusion_tensor(base, other)
    p, q = torch.softmax(other, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    importance = (other - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    ordered = importance.flatten().sort().values
    q1, median, q3 = (ordered[int(f * 127)] for f in (0.25, 0.5, 0.75))
    keep = importance >= median + 1.5 * (q3 - q1)
    assert 0 < int(keep.sum()) < keep.numel()
    assert torch.equal(y, torch.where(keep, other, base))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_arcee_fusion_masked_sum_keeps_mergekits_bits_with_signed_zeros(dtype):
    """b + (x − b)·mask computed as one float32 addcmul equals mergekit's mixed-dtype expression bit for bit,
    signed zeros included (−0 + (−0)·0 is −0, −0 + (+0)·0 is +0)."""
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(300, 64, generator=generator).to(dtype)
    other = (base.float() + 0.05 * torch.randn(300, 64, generator=generator)).to(dtype)
    base[0, :8] = torch.tensor([-0.0, 0.0, -0.0, 0.0, 1, -1, 2, -0.0]).to(dtype)
    other[0, :8] = torch.tensor([0.0, -0.0, -0.0, 0.0, 1, -1, 3, -1]).to(dtype)
    importance = mc.arcee_fusion_importance(other, base)
    q1, median, q3 = mc.fusion_quartiles(importance)
    expected = base + (other - base) * (importance >= median + 1.5 * (q3 - q1)).float()
    got = mc.arcee_fusion_tensor(base, other)
    assert got.dtype == expected.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


def test_arcee_fusion_exact_quartiles_above_the_sample_size(monkeypatch):
    """Above mergekit's sample size we take exact order statistics (radix selection, signed values):
    the same values as sorting the whole tensor."""
    monkeypatch.setattr(mc, "QUANTILE_SAMPLE_SIZE", 10)
    values = torch.randn(1001, generator=torch.Generator().manual_seed(2)).bfloat16()
    ordered = values.sort().values
    expected = torch.stack([ordered[250], ordered[500], ordered[750]])
    assert torch.equal(mc.fusion_quartiles(values), expected)
    assert torch.equal(mc.fusion_quartiles(values.abs()), values.abs().sort().values[[250, 500, 750]])


# ----------------------------------------------------------------------------------------------
# registry: parameters and defaults as mergekit 0.1.5 declares them


def test_registry_declares_mergekits_parameters_and_contracts():
    expected = {
        "nuslerp": ("optional", {"weight": None, "nuslerp_row_wise": False, "nuslerp_flatten": True}),
        "multislerp": ("optional", {"weight": None, "normalize_weights": True, "eps": 1e-8}),
        "karcher": ("ignored", {"max_iter": 10, "tol": 1e-5}),
        "sce": ("required", {"int8_mask": False, "select_topk": 1.0}),
        "arcee_fusion": ("required", {}),
        "ram": ("required", {"epsilon": 1e-5}),
        "ramplus_tl": ("required", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
    }
    for name, (base, parameters) in expected.items():
        method = get_method(name)
        assert method.base == base, name
        assert {p.name: (None if p.required else p.default) for p in method.parameters} == parameters, name
    assert (get_method("nuslerp").min_models, get_method("nuslerp").max_models) == (2, 2)
    assert (get_method("arcee_fusion").min_models, get_method("arcee_fusion").max_models) == (1, 1)   # + the base
    assert get_method("ram").streaming == "elementwise"


def test_non_finite_results_are_refused_with_the_method_name():
    base = torch.zeros(3)
    call = TensorGroupCall({"b": base, "x": torch.tensor([1.0, float("nan"), 0.0]), "y": torch.ones(3)}, "b",
                           {"epsilon": 1e-5})
    with pytest.raises(MergeError, match="ram: the merged tensor is not finite"):
        get_method("ram").implementation()(call)


# ----------------------------------------------------------------------------------------------
# recipes end to end (tiny Llamas): wiring, dtype rules, streaming, bad input


from tests.recipe_helpers import cwd, workspace  # noqa: E402,F401 (fixtures: tiny Llamas in models/)


def _recipe(cwd, name, method, models, base="models/base", extra="", dtype="bfloat16"):
    text = f"merge_method: {method}\ndtype: {dtype}\n" + (f"base_model: {base}\n" if base else "") + extra + "models:\n"
    text += "".join(f"  - model: {m}\n" + (f"    parameters: {{{p}}}\n" if p else "") for m, p in models)
    path = cwd / f"{name}.yml"
    path.write_text(text)
    return str(path)


def _merge(recipe, out, *extra):
    import merge_models

    return merge_models.main(["--config", recipe, "--output_dir", out, "--no_progress", *extra])


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(f"{folder}/model.safetensors")


NAME = "model.layers.0.self_attn.q_proj.weight"


def test_recipes_run_every_method_with_mergekits_wiring(cwd):
    """Each method from a recipe equals its tensor function on the loaded inputs: nuslerp's weights in
    recipe order, karcher counting the base as an input, arcee_fusion / ramplus_tl saved as float32."""
    inputs = {n: _weights(f"models/{n}")[NAME].bfloat16() for n in ("base", "chat", "code")}
    b, x, y = inputs["base"], inputs["chat"], inputs["code"]
    cases = {
        "nuslerp": ([("models/chat", "weight: 0.3"), ("models/code", "weight: 0.7")], "",
                    ms.nuslerp_tensor([x, y], [0.3, 0.7], base=b)),
        "multislerp": ([("models/chat", "weight: 0.5"), ("models/code", "weight: 0.5")], "",
                       ms.multislerp_tensor([x, y], [0.5, 0.5], base=b)),
        "karcher": ([("models/chat", ""), ("models/code", "")], "", ms.karcher_tensor([x, y, b])),
        "sce": ([("models/chat", ""), ("models/code", "")], "parameters: {select_topk: 0.5}\n",
                mc.sce_tensor(b, [x, y], 0.5)),
        "arcee_fusion": ([("models/chat", "")], "", mc.arcee_fusion_tensor(b, x)),
        "ram": ([("models/chat", ""), ("models/code", "")], "parameters: {epsilon: 0.005}\n",
                mc.ram_tensor(b, [x, y], 0.005)),
        "ramplus_tl": ([("models/chat", ""), ("models/code", "")], "parameters: {epsilon: 0.005}\n",
                       mc.ramplus_tl_tensor(b, [x, y], epsilon=0.005)),
    }
    for method, (models, extra, expected) in cases.items():
        assert _merge(_recipe(cwd, method, method, models, extra=extra), f"out-{method}") == 0, method
        merged = _weights(f"out-{method}")
        assert merged[NAME].dtype == expected.dtype, method
        assert torch.equal(merged[NAME], expected), method
        assert merged["model.norm.weight"].dtype == expected.dtype
    # out_dtype wins over mergekit's float32 result
    recipe = _recipe(cwd, "fusion16", "arcee_fusion", [("models/chat", "")], extra="out_dtype: bfloat16\n")
    assert _merge(recipe, "out-fusion16") == 0 and _weights("out-fusion16")[NAME].dtype == torch.bfloat16


def test_ram_and_ramplus_tl_stream_in_pieces_with_the_same_bits(cwd, monkeypatch):
    import utils.engine.streaming as recipe_run   # the one executor

    models = [("models/chat", ""), ("models/code", "")]
    recipes = {m: _recipe(cwd, m, m, models, extra="parameters: {epsilon: 0.005}\n") for m in ("ram", "ramplus_tl")}
    for method, recipe in recipes.items():
        assert _merge(recipe, f"whole-{method}") == 0
    prepared = []
    original = recipe_run.prepare
    monkeypatch.setattr(recipe_run, "prepare", lambda *a, **k: prepared.append(a[0].name) or original(*a, **k))
    monkeypatch.setattr(recipe_run, "PIECE", 100)       # every 16×32 projection now goes in 6 pieces
    for method, recipe in recipes.items():
        assert _merge(recipe, f"pieces-{method}", "--threads", "2") == 0
        whole, pieces = _weights(f"whole-{method}"), _weights(f"pieces-{method}")
        assert [n for n in whole if not torch.equal(whole[n], pieces[n])] == [], method
    assert set(prepared) == {"ramplus_tl"}                 # ram is elementwise: no statistics pass


@pytest.mark.parametrize("method, models, base, message", [
    ("nuslerp", [("models/chat", "weight: 1.0")], "models/base",
     "merge_method nuslerp takes exactly 2 input models besides the base_model; got 1"),
    ("nuslerp", [("models/chat", "weight: 1.0"), ("models/code", "weight: 1.0"), ("models/chatml", "weight: 1.0")],
     None, "merge_method nuslerp takes exactly 2 input models; got 3"),
    ("arcee_fusion", [("models/chat", ""), ("models/code", "")], "models/base",
     "merge_method arcee_fusion takes exactly 1 input models besides the base_model; got 2"),
    ("sce", [("models/chat", "")], None, "merge_method sce needs a base_model"),
    ("multislerp", [("models/chat", "")], None, "missing required parameter 'weight'"),
])
def test_bad_recipes_exit_2_naming_the_method(cwd, capsys, method, models, base, message):
    assert _merge(_recipe(cwd, "bad", method, models, base=base), "out-bad") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (cwd / "out-bad").exists()


def test_non_finite_merge_exits_2_naming_method_and_tensor(cwd, capsys):
    """An input with a NaN entry (mergekit would write the NaN): exit 2 naming the method and tensor."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree("models/chat", "nan-chat")
    state = _weights("nan-chat")
    state[NAME][0, 0] = float("nan")
    save_file(state, "nan-chat/model.safetensors", metadata={"format": "pt"})
    recipe = _recipe(cwd, "nan", "ram", [("nan-chat", ""), ("models/code", "")])
    assert _merge(recipe, "out-nan") == 2
    err = capsys.readouterr().err
    assert "ram: the merged tensor is not finite (NaN/Inf)" in err and NAME in err, err
    assert not (cwd / "out-nan").exists()


def test_flags_take_mergekits_parameters(cwd, capsys):
    """merge_models.py --method <name> --parameter KEY=VALUE: the same merge as the recipe's parameters."""
    import merge_models

    inputs = {n: _weights(f"models/{n}")[NAME] for n in ("base", "chat", "code")}
    b, x, y = inputs["base"], inputs["chat"], inputs["code"]
    common = ["--base_model", "models/base", "--models", "models/chat", "models/code", "--no_progress"]
    assert merge_models.main(["--method", "nuslerp", "--weights", "0.2", "0.8", "--parameter", "nuslerp_flatten=false",
                              "--output_dir", "flag-nuslerp", *common]) == 0
    assert torch.equal(_weights("flag-nuslerp")[NAME], ms.nuslerp_tensor([x, y], [0.2, 0.8], base=b, flatten=False))
    assert merge_models.main(["--method", "ramplus_tl", "--parameter", "r=0.5", "--parameter", "epsilon=0.005",
                              "--output_dir", "flag-ramplus", *common]) == 0
    assert torch.equal(_weights("flag-ramplus")[NAME], mc.ramplus_tl_tensor(b, [x, y], r=0.5, epsilon=0.005))
    assert merge_models.main(["--method", "ram", "--parameter", "bogus=1", "--output_dir", "flag-bad", *common]) == 2
    assert "ram has no parameter 'bogus'" in capsys.readouterr().err
    assert not (cwd / "flag-bad").exists()


def test_population_variance_has_torch_vars_bits():
    """SCE's variance across the models: torch.var(·, dim=0, unbiased=False) to the bit (bfloat16 / float16:
    the float64 Welford recurrence, vectorised; ties, zeros and several scales; blocks cut mid-tensor)."""
    from model_merging_methods import mergekit_consensus
    from model_merging_methods.mergekit_consensus import population_variance

    generator = torch.Generator().manual_seed(8)
    for trial in range(24):
        count, dtype = [2, 3, 4, 5][trial % 4], [torch.bfloat16, torch.float16, torch.float32][trial % 3]
        x = torch.randn(count, 5000 + trial, generator=generator) * [1e-3, 1.0, 1e-6, 50.0][trial % 4]
        if trial % 5 == 0:
            x[:, :2000] = x[0, :2000]                     # zero variance
        x = x.to(dtype).view(count, -1, 1)
        expected = torch.var(x, dim=0, unbiased=False)
        assert torch.equal(population_variance(x), expected), trial
    x = (torch.randn(3, 1000, generator=generator) * 1e-3).bfloat16()
    block, mergekit_consensus.VARIANCE_BLOCK = mergekit_consensus.VARIANCE_BLOCK, 97
    try:
        assert torch.equal(population_variance(x), torch.var(x, dim=0, unbiased=False))
    finally:
        mergekit_consensus.VARIANCE_BLOCK = block


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sce_erase_masks_from_bit_patterns_equal_torchs_comparisons(dtype):
    """[sign δ_i = s] from bit patterns equals torch.where(Σ ≥ 0, δ > 0, δ < 0): every 16-bit pattern of δ
    against shuffled sums of every pattern (±0, ±inf, NaN, subnormals), and sums that are all −0 or all NaN."""
    generator = torch.Generator().manual_seed(7)
    if dtype == torch.float32:
        values = torch.randn(1 << 16, generator=generator) * torch.logspace(-40, 38, 1 << 16)
        values[:6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan")])
    else:
        values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    sums = [values[torch.randperm(values.numel(), generator=generator)] for _ in range(2)]
    sums += [torch.full_like(values, -0.0), torch.full_like(values, float("nan"))]
    for summed in sums:
        deltas = [values, values.flip(0)]
        expected = [torch.where(summed >= 0, d > 0, d < 0) for d in deltas]
        got = mc._agreeing(deltas, summed)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
