"""One registry, one meaning per name: every registered method gives the same tensors as merge_models.py
flags and as the equivalent recipe (bfloat16 and float32), the paper's DARE on each paper method included."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import merge_models
from model_merging_methods.registry import REGISTRY, get_method
from tests.conftest import save_tiny_llama

RUNNABLE = sorted(name for name, m in REGISTRY.items() if m.streamable and not m.statistics)
DARE_SETTINGS = {
    "random": (["--drop_rate", "0.3"], {"drop_rate": 0.3}),
    "magnitude": (["--drop_rate", "0.4", "--mask_strategy", "magnitude"], {"drop_rate": 0.4, "strategy": "magnitude"}),
    "finetuned": (["--drop_rate", "0.2", "--weight_format", "finetuned_weight"],
                  {"drop_rate": 0.2, "weight_format": "finetuned_weight"}),
}


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("one_registry")
    out = {}
    for dtype in ("float32", "bfloat16"):
        base = save_tiny_llama(root / dtype / "base", seed=0, dtype=getattr(torch, dtype))
        out[dtype] = {"base": base, **{f"ft{i}": save_tiny_llama(root / dtype / f"ft{i}", i + 1, base, 0.02,
                                                                  getattr(torch, dtype)) for i in range(2)}}
    return out


def _weights(tmp: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(tmp.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _case(name: str, folders: dict[str, Path]) -> tuple[list[str], dict]:
    """The flags and the recipe document of one merge with non-default parameters."""
    method = get_method(name)
    models = [folders["ft0"]] if method.max_models == 1 else [folders["ft0"], folders["ft1"]]
    flags = ["--method", name]
    recipe: dict = {"merge_method": name}
    if method.base == "ignored":
        models = [folders["base"]] + models if method.max_models != 1 else models
    else:
        flags += ["--base_model", str(folders["base"])]
        recipe["base_model"] = str(folders["base"])
    flags += ["--models", *map(str, models)]
    per_model, top = {}, {}
    weights = [0.7, 0.4, 0.2][:len(models)]
    if method.parameter("weight") is not None:
        flags += ["--weights", *map(str, weights)]
        per_model["weight"] = weights
    if method.parameter("density") is not None:
        flags += ["--density", "0.5"]
        per_model["density"] = [0.5] * len(models)
    if method.scale_parameter and method.parameter(method.scale_parameter) is not None:
        flags += ["--scaling_coefficient", "0.9"]
        top[method.scale_parameter] = 0.9
    if name == "wudi_merging":
        flags += ["--parameter", "iter_num=3"]
        top["iter_num"] = 3
    if name == "slerp":
        flags += ["--slerp_t", "0.3"]
        top["t"] = 0.3
    if name == "nearswap":
        flags += ["--parameter", "t=0.003"]
        top["t"] = 0.003
    recipe["models"] = [{"model": str(m), **({"parameters": {k: v[i] for k, v in per_model.items()}}
                                             if per_model else {})} for i, m in enumerate(models)]
    if top:
        recipe["parameters"] = top
    return flags, recipe


def _run_both(tmp_path: Path, flags: list[str], recipe: dict) -> tuple[dict, dict]:
    assert merge_models.main([*flags, "--output_dir", str(tmp_path / "flags"), "--no_progress", "--seed", "5",
                              "--threads", "2"]) == 0
    config = tmp_path / "recipe.yml"
    config.write_text(yaml.safe_dump(recipe))
    assert merge_models.main(["--config", str(config), "--output_dir", str(tmp_path / "recipe"), "--no_progress",
                              "--seed", "5", "--threads", "2"]) == 0
    return _weights(tmp_path / "flags"), _weights(tmp_path / "recipe")


def _assert_identical(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", RUNNABLE)
def test_flags_equal_recipe_for_every_registered_name(name, dtype, families, tmp_path):
    flags, recipe = _case(name, families[dtype])
    if name == "dare":
        flags += DARE_SETTINGS["random"][0]
        recipe["dare"] = DARE_SETTINGS["random"][1]
    ours, theirs = _run_both(tmp_path, flags, recipe)
    _assert_identical(ours, theirs)
    base = _weights(families[dtype]["base"])
    changed = [k for k in ours if not torch.equal(ours[k], base[k])]
    assert changed, "the merge changed nothing: the case tests nothing"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("setting", sorted(DARE_SETTINGS))
@pytest.mark.parametrize("name", ["average_merging", "task_arithmetic", "ties_merging", "norm_adaptive"])
def test_paper_dare_flags_equal_recipe(name, setting, dtype, families, tmp_path):
    if dtype == "bfloat16" and setting != "random":
        pytest.skip("one DARE setting per method in bfloat16 keeps the suite short")
    flags, recipe = _case(name, families[dtype])
    flags += DARE_SETTINGS[setting][0]
    recipe["dare"] = DARE_SETTINGS[setting][1]
    ours, theirs = _run_both(tmp_path, flags, recipe)
    _assert_identical(ours, theirs)


def test_per_model_drop_rate_in_a_recipe_equals_per_model_flags(families, tmp_path):
    folders = families["float32"]
    flags, recipe = _case("task_arithmetic", folders)
    flags += ["--drop_rate", "0.2", "0.6"]
    for model, rate in zip(recipe["models"], (0.2, 0.6)):
        model["parameters"]["drop_rate"] = rate
    ours, theirs = _run_both(tmp_path, flags, recipe)
    _assert_identical(ours, theirs)


def test_mergekit_names_are_mergekit_methods_and_paper_names_the_papers():
    assert get_method("ties").semantics == "mergekit 0.1.5" and get_method("ties").kind == "group"
    assert get_method("ties_merging").semantics == "MergeLM"
    assert get_method("linear").parameter("normalize").default is True
    assert get_method("dare_ties").parameter("rescale").default is True
    for name in ("linear", "ties", "dare_ties", "dare_linear", "slerp", "breadcrumbs", "breadcrumbs_ties", "della",
                 "della_linear", "model_stock", "nearswap", "passthrough"):
        assert get_method(name).semantics == "mergekit 0.1.5", name
    for name in ("average_merging", "task_arithmetic", "ties_merging", "fisher_merging", "regmean_merging", "dare"):
        assert get_method(name).semantics == "MergeLM", name


def test_paper_options_with_a_mergekit_name_are_refused(families, tmp_path, capsys):
    """The paper's ties_normalize is not mergekit's ties; DARE needs a method that takes a base."""
    folders = families["float32"]
    for method, flag in (("ties", ["--ties_normalize", "mass"]), ("linear", ["--drop_rate", "0.5"]),
                         ("karcher", ["--drop_rate", "0.5"])):
        with pytest.raises(SystemExit) as exit_info:
            merge_models.main(["--base_model", str(folders["base"]), "--models", str(folders["ft0"]), "--method",
                               method, *flag, "--output_dir", str(tmp_path / "o")])
        assert exit_info.value.code == 2
        assert flag[0] in capsys.readouterr().err
    code = merge_models.main(["--models", str(folders["ft0"]), str(folders["ft1"]), "--method", "multislerp",
                              "--drop_rate", "0.5", "--output_dir", str(tmp_path / "o")])   # base optional, not given
    assert code == 2 and "DARE on delta weights needs a base" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


DARE_ANY = sorted(name for name in RUNNABLE if get_method(name).kind == "group" and get_method(name).paper_dare)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", DARE_ANY)
def test_dare_before_any_method_with_a_base_flags_equal_recipe(name, dtype, families, tmp_path):
    """The paper's DARE before every method that takes a base: flags and recipe give the same tensors, and
    they differ from the same merge without DARE."""
    flags, recipe = _case(name, families[dtype])
    plain = tmp_path / "plain"
    assert merge_models.main([*flags, "--output_dir", str(plain), "--no_progress", "--seed", "5"]) == 0
    flags += DARE_SETTINGS["random"][0]
    recipe["dare"] = DARE_SETTINGS["random"][1]
    ours, theirs = _run_both(tmp_path, flags, recipe)
    _assert_identical(ours, theirs)
    without = _weights(plain)
    assert any(not torch.equal(ours[k], without[k]) for k in ours), "DARE changed nothing"


@pytest.mark.parametrize("setting", sorted(DARE_SETTINGS))
@pytest.mark.parametrize("name", ["ties", "slerp", "iso_c"])
def test_dare_before_a_mergekit_or_frontier_method_is_that_method_on_dared_checkpoints(name, setting, families,
                                                                                        tmp_path):
    """DARE + method X == X over the checkpoints that DARE writes per model (dare_state_dict with the model's
    index and the run's seed, rounded to the checkpoint dtype): the definition, end to end, bf16."""
    import shutil

    from safetensors.torch import save_file

    from model_merging_methods import DareOptions, dare_state_dict

    folders = families["bfloat16"]
    flags, _ = _case(name, folders)
    assert merge_models.main([*flags, *DARE_SETTINGS[setting][0], "--output_dir", str(tmp_path / "one_step"), "--no_progress", "--seed", "5"]) == 0
    options = DareOptions(**DARE_SETTINGS[setting][1])
    base = _weights(folders["base"])
    dropped = {}
    for index, key in enumerate(["ft0", "ft1"] if get_method(name).max_models != 1 else ["ft0"]):
        folder = tmp_path / f"dared{index}"
        shutil.copytree(folders[key], folder)
        (folder / "model.safetensors").unlink()
        save_file(dare_state_dict(_weights(folders[key]), base, options, seed=5, model_index=index),
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        dropped[str(folders[key])] = str(folder)
    two_step = [dropped.get(a, a) for a in flags]
    assert merge_models.main([*two_step, "--output_dir", str(tmp_path / "two_step"), "--no_progress"]) == 0
    _assert_identical(_weights(tmp_path / "one_step"), _weights(tmp_path / "two_step"))


def test_unknown_parameter_flag_names_the_method_parameters(families, tmp_path, capsys):
    folders = families["float32"]
    code = merge_models.main(["--base_model", str(folders["base"]), "--models", str(folders["ft0"]), "--method",
                              "ties", "--parameter", "gama=0.1", "--output_dir", str(tmp_path / "o")])
    assert code == 2
    assert "has no parameter 'gama'" in capsys.readouterr().err


def test_mergekit_named_flags_rerun_from_manifest_and_exclude(families, tmp_path, monkeypatch):
    """mergekit's names as flags run on the one executor with every flag feature: --from_manifest (same
    bytes), --exclude_param_names_regex (copied from the base), streamed pieces (same bits as whole)."""
    import json

    import model_merging_methods.recipe_methods as recipe_methods
    import utils.engine.streaming as executor

    monkeypatch.setattr(recipe_methods, "CHUNK", 100)   # slerp's reduction chunks: whole 100-element pieces
    folders = families["bfloat16"]
    args = ["--base_model", str(folders["base"]), "--models", str(folders["ft0"]), str(folders["ft1"]),
            "--method", "dare_ties", "--density", "0.4", "--weights", "0.6", "0.5", "--parameter", "lambda=0.9",
            "--seed", "7", "--exclude_param_names_regex", ".*norm.*", "--no_progress"]
    assert merge_models.main(args + ["--output_dir", str(tmp_path / "first")]) == 0
    manifest = json.loads((tmp_path / "first" / "merge_manifest.json").read_text())
    assert manifest["method"]["semantics"] == "mergekit 0.1.5" and manifest["seed"] == 7
    assert manifest["resolved_parameters"]["global"]["lambda"] == 0.9
    assert merge_models.main(["--from_manifest", str(tmp_path / "first" / "merge_manifest.json"), "--output_dir",
                              str(tmp_path / "again"), "--no_progress"]) == 0
    first, again, base = _weights(tmp_path / "first"), _weights(tmp_path / "again"), _weights(folders["base"])
    _assert_identical(first, again)
    assert all(torch.equal(first[n], base[n]) for n in first if "norm" in n)
    assert not all(torch.equal(first[n], base[n]) for n in first)
    for method, extra in (("dare_ties", ["--density", "0.4"]), ("ties", ["--density", "0.3"]),
                          ("breadcrumbs_ties", ["--density", "0.5"]), ("slerp", ["--slerp_t", "0.3"])):
        models = [str(folders["ft0"])] if method == "slerp" else [str(folders["ft0"]), str(folders["ft1"])]
        common = ["--base_model", str(folders["base"]), "--models", *models, "--method", method, *extra,
                  "--seed", "2", "--no_progress"]
        monkeypatch.setattr(executor, "PIECE", 1 << 30)
        assert merge_models.main(common + ["--output_dir", str(tmp_path / f"whole-{method}")]) == 0
        monkeypatch.setattr(executor, "PIECE", 100)   # every projection streams (statistics passes first)
        assert merge_models.main(common + ["--output_dir", str(tmp_path / f"pieces-{method}"), "--threads",
                                           "3"]) == 0
        _assert_identical(_weights(tmp_path / f"whole-{method}"), _weights(tmp_path / f"pieces-{method}"))


def test_library_merge_state_dicts_gives_the_flags_tensors_for_mergekit_names(families, tmp_path):
    """merge_state_dicts("ties", ..., parameters=...) is mergekit's TIES too (one meaning in every interface)."""
    from model_merging_methods import merge_state_dicts

    folders = families["bfloat16"]
    assert merge_models.main(["--base_model", str(folders["base"]), "--models", str(folders["ft0"]),
                              str(folders["ft1"]), "--method", "ties", "--density", "0.5", "--weights", "0.7", "0.4",
                              "--output_dir", str(tmp_path / "flags"), "--no_progress"]) == 0
    states = [_weights(folders[k]) for k in ("base", "ft0", "ft1")]
    merged = merge_state_dicts("ties", states[0], states[1:], parameters={"weight": [0.7, 0.4], "density": 0.5})
    _assert_identical(_weights(tmp_path / "flags"), merged)


def test_large_whole_tensor_groups_one_at_a_time_write_the_same_bytes(families, tmp_path, monkeypatch):
    """Whole-tensor groups above LARGE_WHOLE elements are merged one at a time (peak memory); with every group
    counted as large the outputs are the same bytes as with the default schedule."""
    import utils.engine.streaming as executor

    flags, _ = _case("multislerp", families["bfloat16"])
    assert merge_models.main([*flags, "--output_dir", str(tmp_path / "default"), "--no_progress", "--threads", "2"]) == 0
    monkeypatch.setattr(executor, "LARGE_WHOLE", 0)
    assert merge_models.main([*flags, "--output_dir", str(tmp_path / "alone"), "--no_progress", "--threads", "2"]) == 0
    _assert_identical(_weights(tmp_path / "default"), _weights(tmp_path / "alone"))


@pytest.mark.parametrize("name, extra", [("lines", []), ("consensus_merging", []),
                                         ("consensus_merging", ["--parameter", "consensus_base=ties_merging"])])
def test_consensus_and_lines_over_task_arithmetic_stream_in_pieces_with_the_same_bytes(name, extra, families, tmp_path,
                                                                                        monkeypatch):
    """Over task arithmetic both are elementwise and stream in flat pieces; over TIES they hold the tensor."""
    import utils.engine.streaming as executor
    from model_merging_methods.registry import get_method

    method = get_method(name)
    params = {"consensus_base": "ties_merging"} if extra else {}
    assert method.piece_mode(params, {}) == ("whole" if extra else "elementwise")
    flags, _ = _case(name, families["bfloat16"])
    flags += extra
    assert merge_models.main([*flags, "--output_dir", str(tmp_path / "whole"), "--no_progress"]) == 0
    monkeypatch.setattr(executor, "PIECE", 100)   # every tensor above 100 entries streams in pieces
    assert merge_models.main([*flags, "--output_dir", str(tmp_path / "pieces"), "--no_progress"]) == 0
    _assert_identical(_weights(tmp_path / "whole"), _weights(tmp_path / "pieces"))
