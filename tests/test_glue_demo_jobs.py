"""scripts/glue_minilm_demo.py's two jobs: the main job (quick chain) and --full share the fine-tuning and are
declared as existing sweep files; a step of the other job is refused before anything is written."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def demo_module():
    spec = importlib.util.spec_from_file_location("glue_minilm_demo", REPO / "scripts" / "glue_minilm_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_jobs_share_the_fine_tuning_and_name_shipped_sweeps():
    demo = demo_module()
    quick, full = demo.STAGES["quick"], demo.STAGES["full"]
    assert quick[0] is full[0] and quick[0].name == "glue_demo_train"
    assert [stage.name for stage in quick] == ["glue_demo_train", "glue_quick_drop", "glue_quick_merge", "glue_quick_merge_dare"]
    for stage in (*quick, *full):
        spec = yaml.safe_load((REPO / "configs" / "sweeps" / f"{stage.name}.yml").read_text())
        assert spec["name"] == stage.name and spec["fixed"]["save_dir"] == demo.DEFAULT_SAVE_DIR
    drop = yaml.safe_load((REPO / "configs" / "sweeps" / "glue_quick_drop.yml").read_text())
    assert drop["axes"]["variant"]["labels"] == ["DARE", "DropOnly"] and drop["fixed"]["max_eval_samples"] == 408
    assert {0.9, 0.95, 0.99} <= set(drop["axes"]["weight_mask_rate"])     # the paper's claim lives at p >= 0.9


def test_a_step_of_the_other_job_is_refused_before_anything_is_written(tmp_path, capsys):
    demo = demo_module()
    with pytest.raises(SystemExit) as raised:
        demo.main(["--save_dir", str(tmp_path / "out"), "--steps", "glue_demo_merge"])
    assert raised.value.code == 2 and "is a sweep of the main job (add --full)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
