"""Checkpoints the LLM scripts write: config from the backbone stating the written dtype, .bin-only inputs
with --allow_pickle, and outputs that would replace or lie inside an input refused."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import inference_llms_instruct_math_code as inference
import merge_llms_instruct_math_code as merge
from llm_helpers import tiny_family, write_data_dir

COMMON = ["--backend", "transformers", "--device", "cpu", "--num_threads", "1", "--max_tokens", "2",
          "--end_index", "1"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llms_checkpoints")
    folders = tiny_family(root)
    config = json.loads((folders["base"] / "config.json").read_text())
    config["origin_marker"] = "backbone"          # to tell whose config the merged folder got
    (folders["base"] / "config.json").write_text(json.dumps(config))
    return {**folders, "data": write_data_dir(root / "data")}


def _merge_flags(family, out, *extra):
    return ["--models_to_merge", str(family["ft_math"]), str(family["ft_code"]), "--model_tasks", "math", "code",
            "--pretrained_model_name", str(family["base"]), "--merging_method_name", "task_arithmetic",
            "--datasets", "gsm8k", "--keep_model", "--data_dir", str(family["data"]), "--save_dir", str(out),
            *COMMON, *extra]


def _merged(out: Path) -> Path:
    return out / "save_merge_models" / "math_code" / "task_arithmetic_scaling_coefficient_1.0"


def test_merged_config_comes_from_the_backbone_and_states_the_dtype(family, tmp_path):
    out = tmp_path / "out"
    assert merge.main(_merge_flags(family, out, "--save_dtype", "bfloat16")) == 0
    config = json.loads((_merged(out) / "config.json").read_text())
    assert config["origin_marker"] == "backbone" and config["vocab_size"] == 260   # aligned to the [PAD] row
    assert config["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(_merged(out) / "model.safetensors").values()} == {torch.bfloat16}


def test_files_from_picks_another_config_source(family, tmp_path):
    out = tmp_path / "out"
    assert merge.main(_merge_flags(family, out, "--files_from", str(family["ft_code"]))) == 0
    config = json.loads((_merged(out) / "config.json").read_text())
    assert "origin_marker" not in config and config["pad_token_id"] == 259 and config["dtype"] == "float32"


def test_merge_into_its_own_input_is_refused(family, tmp_path, capsys):
    """A kept merged folder used as an input of the same-named merge: overwrite=True would delete it."""
    out = tmp_path / "out"
    assert merge.main(_merge_flags(family, out)) == 0
    kept = tmp_path / "kept"
    shutil.copytree(_merged(out), kept)
    shutil.rmtree(_merged(out))
    shutil.copytree(kept, _merged(out))
    (_merged(out) / "my_notes.txt").write_text("mine")
    before = sorted(p.name for p in _merged(out).iterdir())
    flags = _merge_flags(family, out)
    flags[flags.index(str(family["ft_math"]))] = str(_merged(out))
    # the first run's records name other models: the resume is refused before anything loads or merges
    assert merge.main(flags) == 2
    assert "use the same setting to resume, or --restart" in capsys.readouterr().err
    assert sorted(p.name for p in _merged(out).iterdir()) == before
    # without records to resume, the merge itself refuses an output that is one of its inputs
    assert merge.main([*flags, "--restart"]) == 2
    assert "overlaps the model 0 input" in capsys.readouterr().err
    assert sorted(p.name for p in _merged(out).iterdir()) == before


def test_output_inside_an_input_is_refused(family, tmp_path, capsys):
    model = tmp_path / "ft_math"
    shutil.copytree(family["ft_math"], model)
    assert inference.main(["--finetuned_model_name", str(model), "--pretrained_model_name", str(family["base"]),
                           "--dataset_name", "gsm8k", "--weight_mask_rate", "0.5", "--data_dir", str(family["data"]),
                           "--save_dir", str(model / "results"), *COMMON]) == 2
    assert "overlaps the model 0 input" in capsys.readouterr().err
    assert not (model / "results" / "save_models").exists()


@pytest.fixture(scope="module")
def pickled(family, tmp_path_factory):
    """ft_math with its weights as pytorch_model.bin only (the form of many older checkpoints)."""
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickled") / "ft_math_bin"
    shutil.copytree(family["ft_math"], folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    return folder


def test_bin_only_checkpoints_need_allow_pickle(family, pickled, tmp_path, capsys):
    flags = ["--finetuned_model_name", str(pickled), "--pretrained_model_name", str(family["base"]),
             "--dataset_name", "gsm8k", "--weight_mask_rate", "0.5", "--use_weight_rescale", "--keep_model",
             "--data_dir", str(family["data"]), *COMMON]
    assert inference.main([*flags, "--save_dir", str(tmp_path / "refused")]) == 2
    assert re.search("only pickled .bin weights found.*--allow_pickle", capsys.readouterr().err)
    out = tmp_path / "out"
    assert inference.main([*flags, "--save_dir", str(out), "--allow_pickle"]) == 0
    from safetensors.torch import load_file

    written = out / "save_models" / "gsm8k" / "ft_math_bin_inference_mask_0.5_rescale_True"
    dared, tuned = load_file(written / "model.safetensors"), torch.load(pickled / "pytorch_model.bin")
    key = "model.layers.0.mlp.up_proj.weight"
    base = load_file(family["base"] / "model.safetensors")[key]
    kept = (dared[key] - base) != 0
    assert torch.allclose((dared[key] - base)[kept], 2 * (tuned[key] - base)[kept], atol=1e-5)
    assert 0.4 < kept.float().mean() < 0.6
