"""The frontier methods through merge_models.py (flags and recipes): the engine's tensors equal the per-tensor
functions, LiNeS gets each tensor's block index, and bad input exits 2 with one line naming it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import merge_models
from model_merging_methods.frontier import FRONTIER_METHODS, merge_tensor, resolve_parameters
from tests.conftest import save_tiny_llama


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("frontier")
    base = save_tiny_llama(root / "base", seed=0)
    return {"base": base, **{f"ft{i}": save_tiny_llama(root / f"ft{i}", i + 1, base, 0.05) for i in range(3)}}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _run(args: list[str], capsys=None) -> tuple[int, str]:
    code = merge_models.main([*args, "--no_progress"])
    return code, (capsys.readouterr().err if capsys else "")


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


@pytest.mark.parametrize("method, extra", [
    ("tsv_merging", ["--scaling_coefficient", "0.8"]), ("iso_c", []), ("iso_cts", ["--parameter", "common_space_fraction=0.5"]),
    ("cart", ["--parameter", "rank_ratio=0.25"]), ("wudi_merging", ["--parameter", "iter_num=3", "lr=1e-3"]),
    ("consensus_merging", ["--parameter", "tall_mask_lambda=0.4"]), ("lines", ["--scaling_coefficient", "0.6"]),
    ("pcb_merging", ["--parameter", "pcb_ratio=0.3"]),
])
def test_flags_equal_the_per_tensor_functions(family, tmp_path, method, extra):
    models = [family[f"ft{i}"] for i in range(3)]
    code, _ = _run(["--method", method, "--base_model", str(family["base"]), "--models", *map(str, models),
                    "--output_dir", str(tmp_path / "out"), *extra])
    assert code == 0
    out, base = _weights(tmp_path / "out"), _weights(family["base"])
    inputs = [_weights(m) for m in models]
    given = {}
    for i, item in enumerate(extra):
        if item == "--scaling_coefficient":
            from model_merging_methods.frontier import SCALE_PARAMETER
            given[SCALE_PARAMETER[method]] = float(extra[i + 1])
        elif "=" in item:
            key, value = item.split("=")
            given[key] = yaml.safe_load(value)
    params = resolve_parameters(method, given)
    changed = 0
    for name, tensor in out.items():
        deltas = [m[name].float() - base[name].float() for m in inputs]
        expected = merge_tensor(method, deltas, params, layer=_layer(name), num_layers=2) + base[name].float()
        assert torch.allclose(tensor.float(), expected, atol=1e-6, rtol=1e-5), name
        changed += not torch.equal(tensor, base[name])
    assert changed > 0


def test_lines_scales_each_block_by_depth(family, tmp_path):
    models = [family[f"ft{i}"] for i in range(2)]
    assert _run(["--method", "lines", "--base_model", str(family["base"]), "--models", *map(str, models),
                 "--parameter", "alpha=0.2", "beta=0.7", "--output_dir", str(tmp_path / "out")])[0] == 0
    out, base, a, b = _weights(tmp_path / "out"), _weights(family["base"]), _weights(models[0]), _weights(models[1])
    for name, scale in [("model.embed_tokens.weight", 0.2), ("model.layers.0.mlp.up_proj.weight", 0.2),
                        ("model.layers.1.mlp.up_proj.weight", 0.9), ("model.norm.weight", 0.2)]:
        expected = base[name] + scale * ((a[name] - base[name]) + (b[name] - base[name]))
        assert torch.allclose(out[name], expected, atol=1e-6), name


def test_recipes_take_per_model_weights_and_parameters(family, tmp_path):
    recipe = {"merge_method": "tsv_merging", "base_model": str(family["base"]),
              "models": [{"model": str(family["ft0"]), "parameters": {"weight": 2.0}}, {"model": str(family["ft1"])}],
              "parameters": {"alpha": 0.5}}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert _run(["--config", str(tmp_path / "r.yml"), "--output_dir", str(tmp_path / "out")])[0] == 0
    out, base = _weights(tmp_path / "out"), _weights(family["base"])
    a, b = _weights(family["ft0"]), _weights(family["ft1"])
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = base[name] + merge_tensor("tsv_merging", [2.0 * (a[name] - base[name]), b[name] - base[name]], {"alpha": 0.5})
    assert torch.allclose(out[name], expected, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--parameter", "rank_ratio=1.5"], "'rank_ratio' must be in (0, 1], got 1.5"),
    (["--parameter", "rank_ratio=0"], "'rank_ratio' must be in (0, 1], got 0.0"),
    (["--parameter", "density=0.5"], "cart has no parameter 'density'"),
    (["--scaling_coefficient", "1e39"], "is Inf/NaN"),
])
def test_bad_parameters_exit_2(family, tmp_path, capsys, extra, message):
    code, err = _run(["--method", "cart", "--base_model", str(family["base"]), "--models", str(family["ft0"]),
                      str(family["ft1"]), "--output_dir", str(tmp_path / "out"), *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_unknown_recipe_parameter_and_one_model_exit_2(family, tmp_path, capsys):
    recipe = {"merge_method": "iso_cts", "base_model": str(family["base"]), "models": [{"model": str(family["ft0"])},
              {"model": str(family["ft1"])}], "parameters": {"common_space_fractio": 0.5}}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    code, err = _run(["--config", str(tmp_path / "r.yml"), "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "'common_space_fractio' is not a parameter of merge_method iso_cts" in err
    for method in FRONTIER_METHODS:
        code, err = _run(["--method", method, "--base_model", str(family["base"]), "--models", str(family["ft0"]),
                          "--output_dir", str(tmp_path / "one")], capsys)
        assert code == 2 and method in err and "at least 2" in err, (method, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "one").exists()


def test_recipe_gradients_set_per_layer_parameters(family, tmp_path):
    # a gradient over the 2 blocks: block 0 gets 0.5, block 1 gets 1.5; tensors outside the blocks the first value
    recipe = {"merge_method": "iso_c", "base_model": str(family["base"]),
              "models": [{"model": str(family["ft0"])}, {"model": str(family["ft1"])}],
              "parameters": {"scaling_factor": [0.5, 1.5]}}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert _run(["--config", str(tmp_path / "r.yml"), "--output_dir", str(tmp_path / "out")])[0] == 0
    out, base = _weights(tmp_path / "out"), _weights(family["base"])
    a, b = _weights(family["ft0"]), _weights(family["ft1"])
    for name, scale in [("model.layers.0.mlp.up_proj.weight", 0.5), ("model.layers.1.mlp.up_proj.weight", 1.5)]:
        expected = base[name] + merge_tensor("iso_c", [a[name] - base[name], b[name] - base[name]], {"scaling_factor": scale})
        assert torch.allclose(out[name], expected, atol=1e-6), name
