"""No tensor left behind: the fate of every input tensor (utils/engine/accounting.py), and every merge path
(flags, recipes with models: and slices, the task-vector analysis, merge_moe) on checkpoints with an extra
tensor family that the other inputs lack (Qwen3.5-MoE's linear_attn, Qwen3-VL's model.visual.*): each path
refuses it with exit 2 naming the family, or carries it into the output; none drops it."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import analyze_task_vectors
import merge_models
import merge_moe
from tests.conftest import save_tiny_llama
from utils.engine.accounting import DropRule, UnaccountedTensors, account, family

EXTRA = {"model.layers.0.linear_attn.A_log": (2,), "model.layers.1.linear_attn.A_log": (2,),
         "model.layers.1.linear_attn.in_proj_qkvz.weight": (8, 16), "model.visual.blocks.0.attn.qkv.weight": (48, 16),
         "model.visual.merger.mlp.0.weight": (16, 16)}


def test_fates_closed_form():
    inputs = {"a": ["x", "l.0.w", "l.1.w", "head"], "b": ["x", "l.0.w", "l.1.w", "head"]}
    outputs = {"x": {"a": "x", "b": "x"},             # merged (both)
               "l.0.w": {"a": "l.0.w"},                # copied (a alone, same name)
               "l.1.w": {"b": "l.0.w"},                # renumbered (b's layer 0 moves to layer 1)
               "head": {"b": "head"},
               "router": {}}                           # made from nothing
    rules = [DropRule("slices", lambda label, name: name.startswith("l.")),
             DropRule("last slice", lambda label, name: name == "head")]
    fates = account(inputs, outputs, rules)
    assert fates["per_input"]["a"] == {"merged": 1, "copied": 1, "renumbered": 0, "dropped": 2}
    assert fates["per_input"]["b"] == {"merged": 1, "copied": 1, "renumbered": 1, "dropped": 1}
    assert fates["counts"] == {"merged": 2, "copied": 2, "renumbered": 1, "dropped": 3}
    assert fates["dropped_by"] == {"slices": 2, "last slice": 1}
    with pytest.raises(UnaccountedTensors):
        account(inputs, outputs, rules[:1])          # a's head: no output, no rule
    # a tensor both copied and merged elsewhere counts once, as merged
    assert account({"a": ["x"]}, {"x": {"a": "x"}, "y": {"a": "x", "b": "y"}})["counts"]["merged"] == 1


def test_unaccounted_tensors_are_named_by_family():
    inputs = {"base": ["w"], "ft": ["w"] + [f"model.layers.{i}.linear_attn.A_log" for i in range(3)]}
    with pytest.raises(UnaccountedTensors) as error:
        account(inputs, {"w": {"base": "w", "ft": "w"}})
    message = str(error.value)
    assert "3 input tensors would be missing from the output: 3 of ft ('model.layers.N.linear_attn.A_log')" in message
    assert error.value.tensors == {"ft": inputs["ft"][1:]}
    assert family("model.language_model.layers.12.mlp.experts.7.w1") == "model.language_model.layers.N.mlp.experts.N.w1"


def with_extra(folder: Path, target: Path) -> Path:
    """A copy of a tiny Llama checkpoint with the EXTRA tensor family added."""
    target.mkdir()
    for path in folder.iterdir():
        if path.name != "model.safetensors":
            (target / path.name).write_bytes(path.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(len(str(target)))
    tensors.update({name: torch.randn(shape, generator=generator) for name, shape in EXTRA.items()})
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def family_with_extra(tmp_path_factory):
    root = tmp_path_factory.mktemp("extra")
    base = save_tiny_llama(root / "base", seed=0)
    ft0 = save_tiny_llama(root / "ft0", seed=1, base=base)
    ft1 = save_tiny_llama(root / "ft1", seed=2, base=base)
    return {"base": base, "ft0": ft0, "ft1": ft1, "odd": with_extra(ft0, root / "odd"),
            "odd_base": with_extra(base, root / "odd_base"), "odd_ft1": with_extra(ft1, root / "odd_ft1")}


def run(main, argv, capsys):
    code = main(argv + ["--no_progress"])
    return code, capsys.readouterr().err


def recipe(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    return str(path)


def refused(code, err, out: Path) -> bool:
    return code == 2 and not out.exists()


def test_flag_merges_refuse_an_extra_family_in_one_model(family_with_extra, tmp_path, capsys):
    f = family_with_extra
    for method in ("task_arithmetic", "ties_merging"):
        out = tmp_path / method
        code, err = run(merge_models.main, ["--base_model", str(f["base"]), "--models", str(f["odd"]), str(f["ft1"]),
                                            "--method", method, "--output_dir", str(out)], capsys)
        assert refused(code, err, out) and "linear_attn" in err and "is not in base" in err


def test_recipes_refuse_an_extra_family_in_a_non_donor(family_with_extra, tmp_path, capsys):
    """Before the accounting, both recipes wrote a model without the odd model's linear_attn / visual tensors."""
    f = family_with_extra
    linear = recipe(tmp_path, f"models:\n  - model: {f['ft1']}\n  - model: {f['odd']}\nmerge_method: linear\n"
                              f"base_model: {f['base']}\nparameters:\n  weight: 0.5\n")
    out = tmp_path / "linear"
    code, err = run(merge_models.main, ["--config", linear, "--output_dir", str(out)], capsys)
    assert refused(code, err, out)
    assert "5 input tensors would be missing from the output: 5 of " in err
    assert "'model.layers.N.linear_attn.A_log'" in err and "'model.visual.blocks.N.attn.qkv.weight'" in err

    sliced = recipe(tmp_path, f"slices:\n  - sources:\n      - model: {f['base']}\n        layer_range: [0, 1]\n"
                              f"  - sources:\n      - model: {f['odd']}\n        layer_range: [1, 2]\n"
                              f"merge_method: passthrough\n")
    out = tmp_path / "sliced"
    code, err = run(merge_models.main, ["--config", sliced, "--output_dir", str(out)], capsys)
    # the odd model leads its slice: its layer 1 (linear_attn included) is carried, its layer 0 left out by the
    # slice; the output's other tensors follow the donor (base), which has no model.visual.*: refused
    assert refused(code, err, out)
    assert "2 input tensors would be missing from the output: 2 of " in err
    assert "('model.visual.blocks.N.attn.qkv.weight', 'model.visual.merger.mlp.N.weight')" in err


def test_recipes_carry_a_family_every_input_has(family_with_extra, tmp_path, capsys):
    f = family_with_extra
    linear = recipe(tmp_path, f"models:\n  - model: {f['odd']}\n  - model: {f['odd_ft1']}\nmerge_method: linear\n"
                              f"parameters:\n  weight: 0.5\n")
    out = tmp_path / "linear"
    code, err = run(merge_models.main, ["--config", linear, "--output_dir", str(out)], capsys)
    assert code == 0, err
    merged, a, b = (load_file(Path(p) / "model.safetensors") for p in (out, f["odd"], f["odd_ft1"]))
    for name in EXTRA:
        assert torch.allclose(merged[name], 0.5 * a[name] + 0.5 * b[name], atol=1e-6)
    fates = json.loads((out / "merge_manifest.json").read_text())["tensor_fates"]
    assert fates["counts"] == {"merged": 2 * len(a), "copied": 0, "renumbered": 0, "dropped": 0}

    # passthrough slices of the odd model alone: its linear_attn follows its layers, renumbered
    sliced = recipe(tmp_path, f"slices:\n  - sources:\n      - model: {f['odd']}\n        layer_range: [0, 2]\n"
                              f"  - sources:\n      - model: {f['odd']}\n        layer_range: [1, 2]\n"
                              f"merge_method: passthrough\n")
    out = tmp_path / "sliced"
    code, err = run(merge_models.main, ["--config", sliced, "--output_dir", str(out)], capsys)
    assert code == 0, err
    merged = load_file(out / "model.safetensors")
    assert torch.equal(merged["model.layers.2.linear_attn.A_log"], a["model.layers.1.linear_attn.A_log"])
    assert all(torch.equal(merged[name], a[name]) for name in EXTRA)
    fates = json.loads((out / "merge_manifest.json").read_text())["tensor_fates"]
    # layer 1 is copied (to layer 1) and renumbered (to layer 2): one fate each, the first of merged, copied,
    # renumbered
    assert fates["counts"] == {"merged": 0, "copied": len(a), "renumbered": 0, "dropped": 0}


def test_flag_merge_manifest_counts_fates(family_with_extra, tmp_path, capsys):
    f = family_with_extra
    out = tmp_path / "ta"
    code, err = run(merge_models.main, ["--base_model", str(f["odd_base"]), "--models", str(f["odd"]),
                                        str(f["odd_ft1"]), "--method", "task_arithmetic", "--output_dir", str(out),
                                        "--exclude_param_names_regex", r"model\.visual\."], capsys)
    assert code == 0, err
    fates = json.loads((out / "merge_manifest.json").read_text())["tensor_fates"]
    n = len(load_file(f["odd_base"] / "model.safetensors"))
    assert fates["counts"] == {"merged": 3 * (n - 2), "copied": 2, "renumbered": 0, "dropped": 4}
    assert fates["dropped_by"] == {"--exclude_param_names_regex (copied from the reference input)": 4}
    merged, base = load_file(out / "model.safetensors"), load_file(f["odd_base"] / "model.safetensors")
    assert torch.equal(merged["model.visual.merger.mlp.0.weight"], base["model.visual.merger.mlp.0.weight"])


def test_analysis_refuses_an_extra_family(family_with_extra, tmp_path, capsys):
    f = family_with_extra
    out = tmp_path / "analysis"
    code, err = run(analyze_task_vectors.main, ["--base_model", str(f["base"]), "--models", str(f["odd"]),
                                                "--output_dir", str(out), "--no_figures"], capsys)
    assert refused(code, err, out) and "linear_attn" in err and "is not in the base" in err


def test_moe_refuses_an_extra_family_in_the_base_and_names_the_experts_rule(family_with_extra, tmp_path, capsys):
    f = family_with_extra
    config = tmp_path / "moe.yml"
    config.write_text(f"base_model: {f['odd_base']}\ngate_mode: random\nexperts_per_token: 1\nexperts:\n"
                      f"  - source_model: {f['ft0']}\n  - source_model: {f['ft1']}\n")
    out = tmp_path / "moe"
    code, err = run(merge_moe.main, [str(config), "--output_dir", str(out)], capsys)
    assert refused(code, err, out) and "linear_attn" in err and "has no place in the mixtral layout" in err
    # an expert's extra tensors: experts give only their MLPs, by the build's rule, and the manifest counts them
    config.write_text(f"base_model: {f['base']}\ngate_mode: random\nexperts_per_token: 1\nexperts:\n"
                      f"  - source_model: {f['odd']}\n  - source_model: {f['ft1']}\n")
    code, err = run(merge_moe.main, [str(config), "--output_dir", str(out)], capsys)
    assert code == 0, err
    fates = json.loads((out / "merge_manifest.json").read_text())["tensor_fates"]
    n = len(load_file(f["base"] / "model.safetensors"))
    mlp = 3 * 2   # gate/up/down in 2 layers
    assert fates["per_input"]["experts[0]"] == {"merged": 0, "copied": 0, "renumbered": mlp, "dropped": n - mlp + 5}
    assert fates["per_input"]["base_model"] == {"merged": 0, "copied": n - mlp, "renumbered": 0, "dropped": mlp}
    assert fates["dropped_by"]["merge_moe: attention, embeddings and norms come from base_model"] == 2 * (n - mlp) + 5


def test_vocabulary_mismatch_names_both_sizes_and_the_option(tmp_path, capsys):
    base = save_tiny_llama(tmp_path / "base", seed=0)
    wide = save_tiny_llama(tmp_path / "wide", seed=1, base=base, vocab_size=66)
    out = tmp_path / "flags"
    code, err = run(merge_models.main, ["--base_model", str(base), "--models", str(wide), "--method",
                                        "task_arithmetic", "--output_dir", str(out)], capsys)
    assert refused(code, err, out)
    assert "vocabulary sizes differ: 'lm_head.weight' has 64 rows in base" in err
    assert "but 66 in model 0" in err and "--vocab_alignment pad_mean" in err
    linear = recipe(tmp_path, f"models:\n  - model: {base}\n  - model: {wide}\nmerge_method: linear\n"
                              f"parameters:\n  weight: 0.5\n")
    out = tmp_path / "recipe"
    code, err = run(merge_models.main, ["--config", linear, "--output_dir", str(out)], capsys)
    assert refused(code, err, out)
    assert "vocabulary sizes differ: tensor 'model.embed_tokens.weight' has 64 rows in" in err   # the first planned
    assert "but 66 in" in err and "set tokenizer_source (union, base or a model's name)" in err
