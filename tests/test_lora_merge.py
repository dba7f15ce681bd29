"""merge_lora.py: adapter-space merging equals PEFT's add_weighted_adapter tensor for tensor; KnOTS equals
FusionBench's alignment; the output is an adapter PEFT loads; bad inputs exit 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merge_lora
from lora_helpers import load_base, make_adapter, tiny_llama
from model_merging_methods.randomness import derive_seed
from utils.lora.combine import CombineOptions, Factors, combine_module, subspace_alignment

FUSIONBENCH_PYTHON = Path("/work/venvs/fusionbench/bin/python")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """One base; three adapters on q_proj/v_proj/embed_tokens (two of rank 4, one of rank 2 with rslora)
    and two on a single module (layer 0's q_proj: the random combinations are compared there)."""
    root = tmp_path_factory.mktemp("lora_merge")
    base = tiny_llama(root / "base")
    common = dict(target_modules=["q_proj", "v_proj", "embed_tokens"])
    single = dict(target_modules=["q_proj"], layers_to_transform=[0])
    return {"base": base,
            "a": make_adapter(base, root / "a", seed=1, r=4, lora_alpha=8, **common),
            "b": make_adapter(base, root / "b", seed=2, r=4, lora_alpha=4, **common),
            "c": make_adapter(base, root / "c", seed=3, r=2, lora_alpha=3, use_rslora=True, **common),
            "s1": make_adapter(base, root / "s1", seed=4, r=4, lora_alpha=8, **single),
            "s2": make_adapter(base, root / "s2", seed=5, r=4, lora_alpha=2, **single)}


def peft_weighted(base, adapters, weights, combination, seed=None, **kwargs):
    """PEFT's own merge: the adapters loaded side by side, add_weighted_adapter, the new adapter's state."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    model = PeftModel.from_pretrained(load_base(base), str(adapters[0]), adapter_name="x0")
    for index, adapter in enumerate(adapters[1:], 1):
        model.load_adapter(str(adapter), adapter_name=f"x{index}")
    if seed is not None:   # the generator state at the start of each module's merge (after the new
        for method in ("_generalized_task_arithmetic_weighted_adapter",   # adapter's random init)
                       "_svd_generalized_task_arithmetic_weighted_adapter"):
            original = getattr(model.base_model, method)

            def seeded(*args, _original=original, **kw):
                torch.manual_seed(seed)
                return _original(*args, **kw)
            setattr(model.base_model, method, seeded)
    model.add_weighted_adapter([f"x{i}" for i in range(len(adapters))], weights, "merged",
                               combination_type=combination, **kwargs)
    return get_peft_model_state_dict(model, adapter_name="merged")


def ours(family, tmp_path, names, weights, combination, *extra):
    out = tmp_path / f"out_{combination}"
    code = merge_lora.main(["--adapters", *[str(family[n]) for n in names], "--weights", *map(str, weights),
                            "--combination", combination, "--output_dir", str(out), *extra])
    assert code == 0
    return out, load_file(out / "adapter_model.safetensors")


@pytest.mark.parametrize("combination, names, extra", [
    ("linear", "ab", {}), ("cat", "abc", {}), ("svd", "abc", {}), ("svd", "ab", {"svd_rank": 3, "svd_clamp": 0.9}),
    ("ties", "ab", {"density": 0.5}), ("ties", "ab", {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune", "ab", {"density": 0.4}), ("ties_svd", "abc", {"density": 0.5}),
])
def test_deterministic_combinations_equal_add_weighted_adapter(family, tmp_path, combination, names, extra):
    weights = [0.7, -0.4, 1.3][:len(names)]
    expected = peft_weighted(family["base"], [family[n] for n in names], weights, combination, **extra)
    flags = [f"--{k}={v}" for k, v in extra.items()]
    out, merged = ours(family, tmp_path, names, weights, combination, *flags)
    assert merged.keys() == expected.keys()
    for key in expected:
        assert torch.equal(merged[key], expected[key].to(merged[key].dtype)), key


@pytest.mark.parametrize("combination", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_random_combinations_equal_add_weighted_adapter_with_the_same_generator_state(family, tmp_path, combination):
    """PEFT draws from torch's global generator in module order; ours seeds each module's draws from (seed,
    module name). With one adapted module, seeding PEFT's global generator with that module's seed makes
    the draws the same, so the tensors must be equal; a different seed must change them."""
    module = "model.layers.0.self_attn.q_proj"
    expected = peft_weighted(family["base"], [family["s1"], family["s2"]], [0.6, 0.9], combination,
                             seed=derive_seed(7, 0, module), density=0.5)
    _, merged = ours(family, tmp_path, ["s1", "s2"], [0.6, 0.9], combination, "--density", "0.5", "--seed", "7")
    assert merged.keys() == expected.keys()
    for key in expected:
        assert torch.equal(merged[key], expected[key]), key
    _, other = ours(family, tmp_path / "other", ["s1", "s2"], [0.6, 0.9], combination, "--density", "0.5")
    assert any(not torch.equal(other[k], merged[k]) for k in merged)


def test_merged_adapter_loads_in_peft_and_cat_is_the_exact_weighted_sum(family, tmp_path):
    from peft import PeftModel

    out, _ = ours(family, tmp_path, "abc", [0.5, 1.0, -2.0], "cat")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 10 and config["lora_alpha"] == 10 and config["use_rslora"] is False
    record = json.loads((out / "merge_lora.json").read_text())
    assert record["options"]["combination"] == "cat" and len(record["adapters"]) == 3
    merged = PeftModel.from_pretrained(load_base(family["base"]), str(out)).merge_and_unload().state_dict()
    base = load_base(family["base"]).state_dict()
    expected = {}
    for name, weight in zip("abc", [0.5, 1.0, -2.0]):
        folded = PeftModel.from_pretrained(load_base(family["base"]), str(family[name])).merge_and_unload().state_dict()
        for key in folded:
            expected[key] = expected.get(key, base[key]) + weight * (folded[key] - base[key])
    for key in ("model.layers.1.self_attn.v_proj.weight", "model.embed_tokens.weight"):
        assert not torch.equal(merged[key], base[key])
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6)


def _deltas(seed):
    torch.manual_seed(seed)
    return [Factors(torch.randn(3, 12), torch.randn(10, 3), 0.5), Factors(torch.randn(2, 12), torch.randn(10, 2), 2.0)]


def test_knots_alignment_reconstructs_and_linear_knots_is_the_sum_of_deltas():
    factors = _deltas(0)
    deltas = [f.delta() for f in factors]
    u, s, vhs = subspace_alignment(deltas)
    assert u.shape == (10, 5) and len(vhs) == 2
    for delta, vh in zip(deltas, vhs):
        torch.testing.assert_close(u @ torch.diag(s) @ vh, delta, rtol=1e-5, atol=1e-5)
    a, b = combine_module("m", factors, [1.0, 1.0], CombineOptions("knots_linear"), rank=5)
    torch.testing.assert_close(b @ a, deltas[0] + deltas[1], rtol=1e-5, atol=1e-5)
    a, b = combine_module("m", factors, [1.0, 1.0], CombineOptions("knots_ties", density=0.5), rank=5)
    assert a.shape == (5, 12) and not torch.allclose(b @ a, deltas[0] + deltas[1], atol=1e-3)


@pytest.mark.skipif(not FUSIONBENCH_PYTHON.exists(), reason="FusionBench's venv (/work/venvs/fusionbench) is absent")
def test_knots_alignment_equals_fusionbench(tmp_path):
    deltas = [f.delta() for f in _deltas(1)]
    torch.save(deltas, tmp_path / "deltas.pt")
    script = ("import sys, torch\nfrom fusion_bench.method.knots.knots_utils import subspace_alignment\n"
              "d = torch.load(sys.argv[1])\nu, s, v = subspace_alignment(d)\ntorch.save([u, s, list(v)], sys.argv[2])\n")
    subprocess.run([str(FUSIONBENCH_PYTHON), "-c", script, str(tmp_path / "deltas.pt"), str(tmp_path / "fb.pt")],
                   check=True, capture_output=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    u, s, vhs = torch.load(tmp_path / "fb.pt")
    ours_u, ours_s, ours_vhs = subspace_alignment(deltas)
    assert torch.equal(ours_u, u) and torch.equal(ours_s, s)
    assert all(torch.equal(x, y) for x, y in zip(ours_vhs, vhs))


def test_bad_merges_exit_2_and_write_nothing(family, tmp_path, capsys):
    def bad(*args):
        out = tmp_path / "bad"
        capsys.readouterr()
        code = merge_lora.main([*args, "--output_dir", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and not out.exists(), err
        return err

    assert "one rank" in bad("--adapters", str(family["a"]), str(family["c"]), "--combination", "linear")
    assert "needs a density" in bad("--adapters", str(family["a"]), str(family["b"]), "--combination", "ties")
    assert "2 weights for 1 adapters" in bad("--adapters", str(family["a"]), "--weights", "1", "2")
    (tmp_path / "empty").mkdir()
    assert "no adapter_config.json" in bad("--adapters", str(family["a"]), str(tmp_path / "empty"))
    other = tiny_llama(tmp_path / "other_base", hidden=32)
    assert "was trained on" in bad("--adapters", str(family["a"]), "--base_model", str(other))
