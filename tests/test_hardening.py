"""Issue 19: the one output guard (utils/records.py) and the promises that ride on it, tried the way a
careless or hostile user would: outputs that are, contain or lie inside an input, a file at --output_dir,
recipe outputs that overlap each other, and the interrupt message. Each test names the defect it pins."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import analyze_task_vectors
import merge_models
import merge_moe
from tests.conftest import ROOT, save_tiny_llama
from tests.recipe_helpers import build_models


@pytest.fixture(scope="module")
def own_family(tmp_path_factory):
    """Base + two fine-tunes in one folder that the tests may lose (they must not)."""
    root = tmp_path_factory.mktemp("own")
    base = save_tiny_llama(root / "models" / "base", seed=0)
    return {"root": root / "models", "base": base, "ft0": save_tiny_llama(root / "models" / "ft0", 1, base),
            "ft1": save_tiny_llama(root / "models" / "ft1", 2, base)}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _analyze(args, capsys):
    code = analyze_task_vectors.main(args + ["--no_progress", "--no_figures"])
    return code, capsys.readouterr().err


# --- 1. analyze_task_vectors.py deleted or wrote into its inputs ------------------------------------------

@pytest.mark.parametrize("where", ["the input itself", "a folder containing the inputs", "inside an input"])
def test_analysis_output_overlapping_an_input_is_refused_even_with_overwrite(own_family, capsys, where):
    root = own_family["root"]
    target = {"the input itself": own_family["ft0"], "a folder containing the inputs": root,
              "inside an input": own_family["ft0"] / "analysis"}[where]
    before = _snapshot(root)
    code, err = _analyze(["--base_model", str(own_family["base"]), "--models", str(own_family["ft0"]),
                          str(own_family["ft1"]), "--output_dir", str(target), "--overwrite"], capsys)
    assert code == 2 and "overlaps the" in err and "Traceback" not in err, err
    assert _snapshot(root) == before and not (own_family["ft0"] / "analysis").exists()
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")], "a staging folder was left"


def test_analysis_still_writes_a_fresh_folder(own_family, tmp_path, capsys):
    code, _ = _analyze(["--base_model", str(own_family["base"]), "--models", str(own_family["ft0"]),
                        "--output_dir", str(tmp_path / "analysis")], capsys)
    assert code == 0 and json.loads((tmp_path / "analysis" / "analysis.json").read_text())["num_tensors"] > 0


# --- 5. a file at --output_dir with --overwrite was renamed to .NAME.old-PID and left there ----------------

@pytest.mark.parametrize("script", ["merge_models", "analyze_task_vectors"])
def test_a_file_at_the_output_path_is_refused_and_kept(own_family, tmp_path, capsys, script):
    target = tmp_path / "out"
    target.write_text("my notes")
    common = ["--base_model", str(own_family["base"]), "--models", str(own_family["ft0"]), str(own_family["ft1"]),
              "--output_dir", str(target), "--overwrite"]
    if script == "merge_models":
        code = merge_models.main(common + ["--method", "average_merging", "--no_progress"])
        err = capsys.readouterr().err
    else:
        code, err = _analyze(common, capsys)
    assert code == 2 and "is a file, not a folder" in err, err
    assert target.read_text() == "my notes" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_publish_refuses_an_input_known_only_once_resolved(tmp_path):
    """The guard runs again in write_folder_atomic (hub ids become folders only after resolution)."""
    from utils.records import OutputRefusedError, write_folder_atomic

    model = tmp_path / "cache" / "model"
    model.mkdir(parents=True)
    (model / "weights").write_text("w")
    written = []
    with pytest.raises(OutputRefusedError, match="overlaps the resolved input"):
        write_folder_atomic(tmp_path / "cache", lambda folder: written.append(folder), overwrite=True,
                            inputs={"the resolved input": model})
    assert (model / "weights").read_text() == "w" and written == []


def test_guard_refuses_links_and_accepts_hub_ids(tmp_path):
    from utils.records import OutputRefusedError, check_output_folder

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputRefusedError, match="symbolic link"):
        check_output_folder(tmp_path / "link", {}, overwrite=True)
    check_output_folder(tmp_path / "new", {"the model org/name": "org/name"}, overwrite=False)


# --- 5. --intermediate_dir equal to, inside or containing --output_dir was caught only after a stage -------

@pytest.fixture(scope="module")
def recipe_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes19")
    build_models(root)
    return root


@pytest.mark.parametrize("intermediate, output", [("out", "out"), ("out/inter", "out"), ("inter", "inter/out")])
def test_intermediate_dir_overlapping_the_output_is_refused_before_any_stage(recipe_workspace, tmp_path,
                                                                           monkeypatch, capsys, intermediate, output):
    (tmp_path / "models").symlink_to(recipe_workspace / "models")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = merge_models.main(["--config", str(ROOT / "configs" / "recipes" / "two-stage.yml"), "--output_dir", output,
                              "--intermediate_dir", intermediate, "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--intermediate_dir" in err and "overlaps --output_dir" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"], "a stage was written before the refusal"


# --- 7. after Ctrl-C the message read `interrupted ()` ------------------------------------------------------

def test_ctrl_c_message_names_ctrl_c(capsys):
    from utils.cli import run_entry

    def work():
        raise KeyboardInterrupt

    assert run_entry("x.py", work, (), "out") == 130
    assert "x.py: interrupted (Ctrl-C); nothing was written to out" in capsys.readouterr().err


# --- 7. merge_moe.py --max_shard_size_gb -1 was accepted ----------------------------------------------------

@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_moe_max_shard_size_must_be_positive_and_finite(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        merge_moe.main(["--config", str(tmp_path / "moe.yml"), "--output_dir", str(tmp_path / "out"),
                        "--max_shard_size_gb", value])
    assert stop.value.code == 2 and "--max_shard_size_gb" in capsys.readouterr().err


# --- 2. non-finite results were published with exit 0 ------------------------------------------------------

def _recipe_run(recipe_workspace, tmp_path, monkeypatch, capsys, text, *extra):
    (tmp_path / "models").symlink_to(recipe_workspace / "models")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "r.yml").write_text(text)
    code = merge_models.main(["--config", "r.yml", "--output_dir", "out", "--no_progress", *extra])
    return code, capsys.readouterr().err


LINEAR = """merge_method: linear
models:
  - model: models/chat
    parameters: {{weight: {a}}}
  - model: models/code
    parameters: {{weight: {b}}}
dtype: float32
"""
TIES = """merge_method: {method}
base_model: models/base
models:
  - model: models/base
  - model: models/chat
    parameters: {{weight: 1.0, density: {density}}}
  - model: models/code
    parameters: {{weight: 1.0, density: 0.5}}
dtype: float32
"""


@pytest.mark.parametrize("text, says", [
    (LINEAR.format(a=".nan", b=1), "weight must be a finite number"),
    (LINEAR.format(a=".inf", b=1), "weight must be a finite number"),
    (LINEAR.format(a="'-inf'", b=1), "weight must be a finite number"),
    (LINEAR.format(a="[0.5, .nan]", b=1), "weight must be a finite number"),
    (LINEAR.format(a=1, b=-1), "sum to 0"),
    (LINEAR.format(a=0.5, b=-0.5), "sum to 0"),
    (TIES.format(method="ties", density=".nan"), "density must be a finite number"),
    (TIES.format(method="dare_ties", density=0), "density must be in (0, 1]"),
    (TIES.format(method="dare_linear", density=1.5), "density must be in (0, 1]"),
    ("merge_method: slerp\nbase_model: models/base\nmodels:\n  - model: models/base\n  - model: models/chat\n"
     "parameters: {t: .inf}\ndtype: float32\n", "t must be a finite number"),
    ("merge_method: slerp\nbase_model: models/base\nmodels:\n  - model: models/base\n  - model: models/chat\n"
     "parameters: {t: 2.0}\ndtype: float32\n", "t must be in [0, 1]"),
])
def test_recipe_numbers_must_be_finite_and_in_range(recipe_workspace, tmp_path, monkeypatch, capsys, text, says):
    code, err = _recipe_run(recipe_workspace, tmp_path, monkeypatch, capsys, text)
    assert code == 2 and says in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_writer_refuses_a_nonfinite_tensor_no_input_had(recipe_workspace, tmp_path, monkeypatch, capsys):
    """Gradient weights that sum to 0 at every layer pass the parameter checks; the writer still refuses."""
    code, err = _recipe_run(recipe_workspace, tmp_path, monkeypatch, capsys, LINEAR.format(a="[1, 1]", b="[-1, -1]"))
    assert code == 2 and "holds NaN or Inf values that no input had" in err and "output tensor '" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "r.yml"]


def test_writer_keeps_a_nan_an_input_already_had(tmp_path):
    """The interface: the executor hands the writer its inputs' readers; a NaN an input had may stay."""
    import torch
    from safetensors.torch import save_file

    from utils.engine.reader import CheckpointReader
    from utils.engine.writer import NonFiniteOutputError, PlannedTensor, ShardedSafetensorsWriter

    for name, values in (("clean", [1.0, 2.0]), ("broken", [float("nan"), 2.0])):
        (tmp_path / name).mkdir()
        save_file({"w": torch.tensor(values), "other": torch.ones(3)}, str(tmp_path / name / "model.safetensors"))
    plan = [PlannedTensor("w", torch.float32, (2,))]
    nan = torch.tensor([float("nan"), 1.0])
    for inputs, allowed in (([], False), (["clean"], False), (["clean", "broken"], True)):
        folder = tmp_path / f"out-{len(inputs)}"
        folder.mkdir()
        writer = ShardedSafetensorsWriter(folder, plan, 2**20,
                                          inputs=[CheckpointReader(tmp_path / name) for name in inputs])
        if allowed:
            writer.write("w", nan)
            assert writer.finish() == ["model.safetensors"]
        else:
            with pytest.raises(NonFiniteOutputError, match="output tensor 'w' holds NaN or Inf"):
                writer.write("w", nan)
    writer = ShardedSafetensorsWriter(tmp_path / "out-0", [PlannedTensor("w", torch.float32, (2,))], 2**20, inputs=[])
    with pytest.raises(NonFiniteOutputError):
        writer.write("w", torch.tensor([1.0, float("inf")]), part=True)


def test_has_nonfinite_finds_every_nan_and_inf_wherever_it_sits():
    """The one-pass min/max check: a NaN or ±Inf at any position (vector lanes, tails) of any float dtype."""
    import torch

    from utils.engine.writer import has_nonfinite

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for n in (1, 7, 33, 1000, 65_537):
            clean = torch.randn(n, generator=generator).to(dtype)
            assert not has_nonfinite(clean) and not has_nonfinite(clean.reshape(1, n)[:, ::2])
            for position in {0, 15, 16, n // 2, n - 1} & set(range(n)):
                for bad in (float("nan"), float("inf"), float("-inf")):
                    broken = clean.clone()
                    broken[position] = bad
                    assert has_nonfinite(broken), (dtype, n, position, bad)
    assert not has_nonfinite(torch.empty(0)) and not has_nonfinite(torch.arange(5))
    assert has_nonfinite(torch.tensor([1 + 1j, complex(0, float("nan"))])) and not has_nonfinite(torch.ones(3, dtype=torch.complex64))


@pytest.mark.parametrize("key, value", [("residual_scale", ".inf"), ("residual_scale", ".nan"),
                                        ("noise_scale", ".inf")])
def test_moe_scales_must_be_finite(key, value):
    import yaml

    from utils.moe.config import MoEConfigError, parse_moe_config

    data = yaml.safe_load(f"base_model: b\ngate_mode: random\nexperts:\n  - source_model: e\n    {key}: {value}\n")
    with pytest.raises(MoEConfigError, match=rf"experts\[0\]\.{key}"):
        parse_moe_config(data)


# --- 5. a billion-laughs recipe exited 2 but printed a 25 MB "line" -----------------------------------------

def test_error_messages_are_capped(recipe_workspace, tmp_path, monkeypatch, capsys):
    levels = ["&a [" + ", ".join(["lol"] * 10) + "]"]
    for level in "bcdef":                                  # 10^6 'lol's once expanded (a 7 MB repr)
        levels.append(f"&{level} [" + ", ".join([f"*{chr(ord(level) - 1)}"] * 10) + "]")
    laughs = ("merge_method: linear\nmodels:\n  - model: models/chat\n    parameters:\n      weight: [{filter: mlp, "
              "value: [" + ", ".join(levels) + "]}]\n  - model: models/code\n")
    code, err = _recipe_run(recipe_workspace, tmp_path, monkeypatch, capsys, laughs)
    assert code == 2 and len(err) < 5000 and err.count("\n") == 1 and "characters cut" in err, len(err)


# --- found by scripts/attack_catalogue.py -------------------------------------------------------------------

@pytest.mark.parametrize("text", ["tasks: [1,\n", "- just\n- a list\n"])
def test_a_glue_config_that_is_not_a_yaml_mapping_is_one_line(tmp_path, capsys, text):
    import train_plms_glue

    (tmp_path / "bad.yml").write_text(text)
    with pytest.raises(SystemExit) as stop:
        train_plms_glue.main(["--config", str(tmp_path / "bad.yml"), "--dataset_name", "mrpc"])
    assert "GLUE config" in str(stop.value.code) and str(tmp_path / "bad.yml") in str(stop.value.code)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_lora_weights_must_be_finite(tmp_path, capsys, value):
    import merge_lora

    with pytest.raises(SystemExit) as stop:
        merge_lora.main(["--adapters", "a", "b", "--weights", value, "1", "--output_dir", str(tmp_path / "out")])
    assert stop.value.code == 2 and "must be finite" in capsys.readouterr().err


# --- 7. a manifest whose rerun.models is a string got a misleading message ----------------------------------

def test_manifest_with_models_as_a_string_is_named(own_family, tmp_path, capsys):
    first = tmp_path / "first"
    assert merge_models.main(["--base_model", str(own_family["base"]), "--models", str(own_family["ft0"]),
                              "--method", "task_arithmetic", "--output_dir", str(first), "--no_progress"]) == 0
    manifest = json.loads((first / "merge_manifest.json").read_text())
    manifest["rerun"]["models"] = str(own_family["ft0"])
    (tmp_path / "forged.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    code = merge_models.main(["--from_manifest", str(tmp_path / "forged.json"), "--output_dir", str(tmp_path / "again"),
                              "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "rerun.models must be a list of model paths" in err, err
    assert not (tmp_path / "again").exists()
