"""End-to-end runs of the three GLUE scripts (main(argv)) on a tiny random BERT and real GLUE slices,
and the bad inputs that must stop them with a clear message and no partial result."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from glue_helpers import glue_slice, tiny_bert
from inference_plms_glue import main as inference_main
from merge_plms_glue import main as merge_main
from train_plms_glue import main as train_main
from utils.glue.data import load_glue_config, load_task_splits
from utils.glue.checkpoints import load_classifier
from utils.glue.training import encode_split, evaluate_task, make_loader

NAME = "tiny-bert_lr0.001"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_e2e")
    glue = glue_slice(root)
    lm = tiny_bert(root, glue)
    save = root / "runs"
    common = ["--language_model_name", str(lm), "--glue_dir", str(glue), "--device", "cpu", "--no_progress",
              "--learning_rate", "0.001", "--batch_size", "16"]
    train_main(["--dataset_name", "mrpc", "--num_epochs", "2", "--num_runs", "1", "--save_dir", str(save), *common])
    train_main(["--dataset_name", "stsb", "--num_epochs", "1", "--num_runs", "1", "--save_dir", str(save), *common])
    train_main(["--dataset_name", "rte", "--num_epochs", "1", "--num_runs", "2", "--save_dir", str(save), *common])
    return SimpleNamespace(root=root, glue=glue, lm=lm, save=save, common=common)


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def outputs_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_train_single_task_outputs(ws):
    folder = ws.save / "save_models" / "mrpc" / NAME
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert (folder / "tokenizer_config.json").is_file() and not list(folder.glob("*.bin"))
    result = read_json(ws.save / "save_model_results" / "mrpc" / NAME / f"{NAME}.json")
    assert result["config"]["learning_rate"] == 0.001 and result["seeds"]["run_seed"] == 42
    assert {"torch", "transformers", "numpy", "scikit-learn"} <= set(result["versions"])
    assert len(result["training"]["history"]) == 2 and result["training"]["best_epoch"] in (1, 2)
    scores = [epoch["validation_score"] for epoch in result["training"]["history"]]
    assert result["training"]["best_epoch"] == 1 + scores.index(max(scores))           # first best epoch restored
    arguments = result["training"]["training_arguments"]                              # transformers' Trainer
    assert arguments["load_best_model_at_end"] and arguments["metric_for_best_model"] == "main_score" and arguments["eval_strategy"] == "epoch"
    assert (folder / "training_state.json").is_file() and not list(folder.parent.glob(".*"))  # the Trainer's work folder is gone
    best = result["training"]["history"][result["training"]["best_epoch"] - 1]["validation"]["mrpc"]
    assert result["validation_metrics"]["mrpc"]["averaged_scores"] == pytest.approx(best["averaged_scores"])
    test = result["test_metrics"]["mrpc"]
    assert 0.0 <= test["accuracy"] <= 1.0 and test["averaged_scores"] == pytest.approx((test["accuracy"] + test["f1"]) / 2)
    assert result["num_examples"]["mrpc"] == {"train": 94, "validation": 11, "test": 59}  # 119 raw pairs minus dev ids


def test_train_runs_are_named_and_seeded(ws):
    run1 = read_json(ws.save / "save_model_results" / "rte" / f"{NAME}_run1" / f"{NAME}_run1.json")
    assert run1["seeds"]["run_seed"] == 43 and (ws.save / "save_models" / "rte" / f"{NAME}_run1" / "model.safetensors").is_file()


def test_train_multitask(ws, tmp_path):
    train_main(["--dataset_name", "rte", "--auxiliary_dataset_name", "stsb", "--multitask_training", "--num_epochs", "1",
                "--num_runs", "1", "--save_dir", str(tmp_path), *ws.common])
    folder = tmp_path / "save_models" / "stsb_rte" / NAME
    assert (folder / "multitask_heads.safetensors").is_file() and (folder / "model.safetensors").is_file()
    result = read_json(tmp_path / "save_model_results" / "stsb_rte" / NAME / f"{NAME}.json")
    assert set(result["test_metrics"]) == {"stsb", "rte"} and "pearson" in result["test_metrics"]["stsb"]


def test_inference_plain_dare_and_variants(ws):
    plain = inference_main(["--dataset_names", "mrpc", "--save_dir", str(ws.save), *ws.common[:-2]])[0]
    trained = read_json(ws.save / "save_model_results" / "mrpc" / NAME / f"{NAME}.json")
    assert plain["metrics"]["test"]["loss"] == pytest.approx(trained["test_metrics"]["mrpc"]["loss"], rel=1e-5)
    assert (ws.save / "save_model_results" / "mrpc" / f"{NAME}_inference_mask_0.0" / f"{NAME}_inference_mask_0.0.json").is_file()
    dare = inference_main(["--dataset_names", "mrpc", "--weight_mask_rate", "0.5", "--use_weight_rescale", "--save_dir", str(ws.save), *ws.common[:-2]])[0]
    again = inference_main(["--dataset_names", "mrpc", "--weight_mask_rate", "0.5", "--use_weight_rescale", "--save_dir", str(ws.save), *ws.common[:-2]])[0]
    assert dare["metrics"]["test"]["loss"] != pytest.approx(plain["metrics"]["test"]["loss"], rel=1e-6)
    assert dare["metrics"] == again["metrics"]
    inference_main(["--dataset_names", "mrpc", "stsb", "--weight_mask_rate", "0.1", "--use_weight_rescale", "--weight_format", "finetuned_weight",
                    "--mask_strategy", "magnitude", "--seed", "3", "--save_dir", str(ws.save), *ws.common[:-2]])
    name = f"{NAME}_inference_mask_0.1_rescale_True_strategy_magnitude_weight_format_finetuned_weight_seed3"
    assert (ws.save / "save_model_results" / "stsb" / name / f"{name}.json").is_file()


def test_inference_batch_of_rates_and_seeds_equals_single_calls(ws, tmp_path):
    """--weight_mask_rates / --seeds load once and write, per (rate, seed), what a single call writes."""
    save = tmp_path / "batch"
    save.mkdir()
    (save / "save_models").symlink_to(ws.save / "save_models", target_is_directory=True)
    flags = ["--dataset_names", "mrpc", "--use_weight_rescale", *ws.common[:-2]]
    batched = inference_main([*flags, "--weight_mask_rates", "0.0", "0.3", "0.9", "--seeds", "0", "2", "--save_dir", str(save)])
    assert [(p["config"]["weight_mask_rate"], p["config"]["seed"]) for p in batched] == [(0.0, 0), (0.0, 2), (0.3, 0), (0.3, 2), (0.9, 0), (0.9, 2)]
    assert all(p["config"]["weight_mask_rates"] is None and p["config"]["seeds"] is None for p in batched)
    for payload in batched[2:]:
        rate, seed = payload["config"]["weight_mask_rate"], payload["config"]["seed"]
        single = inference_main([*flags, "--weight_mask_rate", str(rate), "--seed", str(seed), "--save_dir", str(ws.save)])[0]
        assert payload["metrics"] == single["metrics"]
        assert {k: v for k, v in payload["config"].items() if k not in ("save_dir", "checkpoint")} == \
            {k: v for k, v in single["config"].items() if k not in ("save_dir", "checkpoint")}
        name = f"{NAME}_inference_mask_{rate}_rescale_True" + (f"_seed{seed}" if seed else "")
        assert read_json(save / "save_model_results" / "mrpc" / name / f"{name}.json")["metrics"] == single["metrics"]
    assert batched[0]["metrics"] == batched[1]["metrics"]  # p = 0: the fine-tuned model, whatever the seed
    assert batched[2]["metrics"] != batched[3]["metrics"]  # different masks


def test_merge_average_matches_manual_average(ws):
    args = ["--dataset_names", "mrpc", "stsb", "--merging_method_name", "average_merging", "--merge_grid", "none",
            "--select_on", "test", "--save_dir", str(ws.save), *ws.common[:-2]]
    result = merge_main(args)[0]
    config = load_glue_config()
    models = {t: load_classifier(ws.save / "save_models" / t / NAME) for t in ("mrpc", "stsb")}
    merged = models["mrpc"]
    other = models["stsb"].state_dict()
    with torch.no_grad():
        for name, parameter in merged.named_parameters():
            if not name.startswith("classifier"):
                parameter.copy_((parameter + other[name]) / 2)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ws.lm))
    test = load_task_splits("mrpc", config, ws.glue, splits=("test",))["test"]
    loader = make_loader(encode_split(tokenizer, test, config["tasks"]["mrpc"], 128), tokenizer, 16, shuffle=False)
    expected = evaluate_task(merged, loader, config["tasks"]["mrpc"], "cpu")
    winner = result["winners"]["mean"]
    assert winner["test_metrics"]["mrpc"]["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert winner["selection_metrics"] == winner["test_metrics"]
    stem = ws.save / "save_merge_results" / "mrpc_stsb" / "average_merging" / "tiny-bert_grid_none_select_on_test"
    assert read_json(stem.with_suffix(".json"))["winners"]["stsb"]["name"] == "default"
    assert (stem.parent / f"{stem.name}_settings" / "default.json").is_file()


@pytest.mark.parametrize("method, grid_size", [("task_arithmetic", 4), ("ties_merging", 4), ("fisher_merging", 1), ("regmean_merging", 2), ("regmean_plusplus", 2),
                                               ("norm_adaptive", 4)])
def test_merge_methods_and_dare(ws, method, grid_size):
    base = ["--dataset_names", "mrpc", "stsb", "--merge_grid", "small", "--nums_fisher_examples", "32",
            "--save_dir", str(ws.save), *ws.common[:-2], "--batch_size", "16"]
    result = merge_main(["--merging_method_name", method, *base])[0]
    assert len(result["settings"]) == grid_size and set(result["winners"]) == {"mean", "mrpc", "stsb"}
    for winner in result["winners"].values():
        assert set(winner["test_metrics"]) == {"mrpc", "stsb"}
        # a one-setting grid has nothing to select: its validation split is not evaluated
        assert winner["selection_split"] == ("validation" if grid_size > 1 else None)
    if grid_size > 1:
        best = max(result["settings"], key=lambda r: r["selection_scores"]["mean"])
        assert result["winners"]["mean"]["selection_scores"]["mean"] == best["selection_scores"]["mean"]
    else:
        assert result["settings"][0]["selection_metrics"] is None and "selection_evaluation_time_s" not in result["settings"][0]["timing"]
    dare = merge_main(["--merging_method_name", "mask_merging", "--mask_apply_method", method, "--use_weight_rescale", *base])[0]
    distinct = {json.dumps(w["setting"], sort_keys=True) for w in result["winners"].values()}
    assert len(dare["settings"]) == 3 * len(distinct)
    assert {s["weight_mask_rate"] for s in dare["settings"]} == {0.3, 0.5, 0.9}
    assert (ws.save / "save_merge_results" / "mrpc_stsb" / "mask_merging" / method / "tiny-bert_grid_small.json").is_file()


def expect_exit(call, argv, capsys, *fragments, code=None):
    with pytest.raises(SystemExit) as raised:
        call(argv)
    message = str(raised.value.code) + capsys.readouterr().err
    if code is not None:
        assert raised.value.code == code
    else:
        assert raised.value.code not in (0, None)
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_task_and_missing_split(ws, tmp_path, capsys):
    expect_exit(train_main, ["--dataset_name", "wnli", "--save_dir", str(tmp_path), *ws.common], capsys, "unknown GLUE task 'wnli'", code=2)
    expect_exit(train_main, ["--dataset_name", "qnli", "--num_runs", "1", "--save_dir", str(tmp_path), *ws.common], capsys,
                "GLUE task 'qnli': train split", "QNLI/train.tsv")
    expect_exit(inference_main, ["--dataset_names", "cola", "--save_dir", str(ws.save), *ws.common[:-2]], capsys,
                "checkpoint of task 'cola' not found")
    assert outputs_under(tmp_path) == []


def test_head_mismatch(ws, tmp_path, capsys):
    shutil.copytree(ws.save / "save_models" / "mrpc" / NAME, tmp_path / "save_models" / "stsb" / NAME)
    shutil.copytree(ws.save / "save_models" / "mrpc" / NAME, tmp_path / "save_models" / "mrpc" / NAME)
    expect_exit(inference_main, ["--dataset_names", "mrpc", "stsb", "--save_dir", str(tmp_path), *ws.common[:-2]], capsys,
                "has a head with 2 labels but task 'stsb' needs 1")
    expect_exit(merge_main, ["--dataset_names", "mrpc", "stsb", "--merge_grid", "none", "--save_dir", str(tmp_path), *ws.common[:-2]], capsys,
                "has a head with 2 labels but task 'stsb' needs 1")
    assert not (tmp_path / "save_model_results").exists() and not (tmp_path / "save_merge_results").exists()


def test_different_architectures(ws, tmp_path, capsys):
    other_lm = tiny_bert(tmp_path / "wide", ws.glue, hidden=48)
    train_main(["--dataset_name", "rte", "--num_epochs", "1", "--num_runs", "1", "--save_dir", str(tmp_path / "wide_runs"),
                *ws.common[:1], str(other_lm), *ws.common[2:]])
    shutil.copytree(tmp_path / "wide_runs" / "save_models" / "rte" / NAME, tmp_path / "save_models" / "rte" / NAME)
    shutil.copytree(ws.save / "save_models" / "mrpc" / NAME, tmp_path / "save_models" / "mrpc" / NAME)
    expect_exit(merge_main, ["--dataset_names", "mrpc", "rte", "--merge_grid", "none", "--save_dir", str(tmp_path), *ws.common[:-2]], capsys,
                "different architectures", "word_embeddings.weight", ", 32) in", ", 48) in")
    assert not (tmp_path / "save_merge_results").exists()


def test_drop_rate_outside_range(ws, tmp_path, capsys):
    expect_exit(inference_main, ["--dataset_names", "mrpc", "--weight_mask_rate", "1.0", "--save_dir", str(ws.save), *ws.common[:-2]],
                capsys, "--weight_mask_rate", "drop rate must be in [0, 1), got 1.0", code=2)
    expect_exit(merge_main, ["--dataset_names", "mrpc", "stsb", "--merging_method_name", "mask_merging", "--merge_grid", "none",
                             "--weight_mask_rate", "-0.1", "--save_dir", str(ws.save), *ws.common[:-2]], capsys,
                "drop rate must be in [0, 1), got -0.1", code=2)
    config = yaml.safe_load(open(Path(__file__).resolve().parents[1] / "configs" / "glue.yaml", encoding="utf-8"))
    config["merge_grids"]["small"]["mask_merging"]["weight_mask_rate"] = [0.5, 1.0]
    config["merge_grids"]["small"]["task_arithmetic"]["scaling_coefficient"] = []
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = tmp_path / "out"
    shutil.copytree(ws.save / "save_models", out / "save_models")
    shutil.copytree(ws.save / "save_merge_results", out / "save_merge_results")
    before = sorted(outputs_under(out))
    expect_exit(merge_main, ["--config", str(bad), "--dataset_names", "mrpc", "stsb", "--merging_method_name", "mask_merging",
                             "--mask_apply_method", "average_merging", "--merge_grid", "small", "--use_weight_rescale", "--save_dir", str(out),
                             *ws.common[:-2]], capsys, "drop rate 1.0", "outside [0, 1)")
    expect_exit(merge_main, ["--config", str(bad), "--dataset_names", "mrpc", "stsb", "--merging_method_name", "task_arithmetic",
                             "--merge_grid", "small", "--save_dir", str(out), *ws.common[:-2]], capsys,
                "empty grid: axis 'scaling_coefficient'")
    assert sorted(outputs_under(out)) == before


def test_mask_merging_needs_apply_method_result(ws, tmp_path, capsys):
    shutil.copytree(ws.save / "save_models", tmp_path / "save_models")
    expect_exit(merge_main, ["--dataset_names", "mrpc", "stsb", "--merging_method_name", "mask_merging", "--mask_apply_method",
                             "regmean_merging", "--save_dir", str(tmp_path), *ws.common[:-2]], capsys,
                "needs regmean_merging's result file")
    assert not (tmp_path / "save_merge_results").exists()


@pytest.mark.parametrize("method, flags", [
    ("fisher_merging", lambda n: ["--nums_fisher_examples", n, "--fisher_scaling_coefficients", "1.0", "1.0"]),
    ("regmean_merging", lambda n: ["--nums_regmean_examples", n, "--reduce_non_diagonal_ratio", "1.0"]),
])
def test_statistics_examples_depend_only_on_seed_and_count(ws, tmp_path, method, flags):
    """Every setting of a grid with several example counts, re-run alone (--merge_grid none), gives the
    same metrics bit for bit: the statistics' examples do not depend on the settings merged before."""
    config = yaml.safe_load(open(Path(__file__).resolve().parents[1] / "configs" / "glue.yaml", encoding="utf-8"))
    config["merge_grids"]["counts"] = {"fisher_merging": {"fisher_scaling_coefficient": [1.0], "nums_fisher_examples": [16, 32, 48]},
                                       "regmean_merging": {"nums_regmean_examples": [16, 32, 48], "reduce_non_diagonal_ratio": [1.0]}}
    path = tmp_path / "counts.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    shutil.copytree(ws.save / "save_models", tmp_path / "save_models")
    common = ["--config", str(path), "--dataset_names", "mrpc", "stsb", "--merging_method_name", method, "--select_on", "test",
              "--save_dir", str(tmp_path), *ws.common[:-2], "--batch_size", "16"]
    grid = merge_main([*common, "--merge_grid", "counts"])[0]
    assert len(grid["settings"]) == 3
    axis = "nums_fisher_examples" if method == "fisher_merging" else "nums_regmean_examples"
    for record in grid["settings"]:
        alone = merge_main([*common, "--merge_grid", "none", *flags(str(record["setting"][axis]))])[0]["settings"][0]
        assert alone["selection_metrics"] == record["selection_metrics"], record["name"]
    losses = {record["selection_metrics"]["mrpc"]["loss"] for record in grid["settings"]}
    assert len(losses) == 3                                        # the counts do change the merge


def test_mask_merging_searches_each_task_on_its_own_base_setting(ws, tmp_path):
    """Default (the original's protocol): task t's DARE + X winner is the best drop rate on X's winning
    setting for t. --mask_merging_search wide lets t choose among all of X's winning settings."""
    shutil.copytree(ws.save / "save_models", tmp_path / "save_models")
    apply_file = tmp_path / "save_merge_results" / "mrpc_stsb" / "task_arithmetic" / "tiny-bert_grid_small_select_on_test.json"
    settings = [{"scaling_coefficient": value} for value in (0.3, 0.5, 1.0)]

    def write_apply_winners(chosen: dict) -> None:
        apply_file.parent.mkdir(parents=True, exist_ok=True)
        apply_file.write_text(json.dumps({"winners": {c: {"setting": s} for c, s in chosen.items()}}), encoding="utf-8")

    write_apply_winners(dict(zip(["mean", "mrpc", "stsb"], settings)))
    common = ["--dataset_names", "mrpc", "stsb", "--merging_method_name", "mask_merging", "--mask_apply_method", "task_arithmetic",
              "--merge_grid", "small", "--select_on", "test", "--use_weight_rescale", "--save_dir", str(tmp_path), *ws.common[:-2]]
    wide = merge_main([*common, "--mask_merging_search", "wide"])[0]
    assert len(wide["settings"]) == 9
    for criterion, winner in wide["winners"].items():
        assert winner["selection_scores"][criterion] == max(r["selection_scores"][criterion] for r in wide["settings"])
    # give every criterion a base setting other than the one its wide search picked
    own = {c: next(s for s in settings if s != w["setting"]) for c, w in wide["winners"].items()}
    write_apply_winners(own)
    per_task = merge_main(common)[0]
    for criterion, winner in per_task["winners"].items():
        assert winner["setting"] == own[criterion]
        candidates = [r for r in per_task["settings"] if r["setting"] == own[criterion]]
        assert winner["selection_scores"][criterion] == max(r["selection_scores"][criterion] for r in candidates)
        assert winner["selection_scores"][criterion] <= wide["winners"][criterion]["selection_scores"][criterion]
    folder = tmp_path / "save_merge_results" / "mrpc_stsb" / "mask_merging" / "task_arithmetic"
    assert (folder / "tiny-bert_grid_small_select_on_test.json").is_file()
    assert (folder / "tiny-bert_grid_small_select_on_test_search_wide.json").is_file()


def test_train_never_deletes_a_folder_it_did_not_write(ws, tmp_path, capsys):
    args = ["--dataset_name", "mrpc", "--num_epochs", "1", "--num_runs", "1", "--save_dir", str(tmp_path), *ws.common]
    folder = tmp_path / "save_models" / "mrpc" / NAME
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine", encoding="utf-8")
    expect_exit(train_main, args, capsys, str(folder), "not written by train_plms_glue.py", "--overwrite", code=2)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and not (tmp_path / "save_model_results").exists()
    # a checkpoint of the original code (its marker is trainer_state.json) is evaluated as it is, as the original did
    shutil.rmtree(folder)
    shutil.copytree(ws.save / "save_models" / "mrpc" / NAME, folder)
    (folder / "training_state.json").unlink()
    (folder / "trainer_state.json").write_text("{}", encoding="utf-8")
    result = train_main(args)[0]
    trained = read_json(ws.save / "save_model_results" / "mrpc" / NAME / f"{NAME}.json")
    assert result["training"]["written_by"] == "original MergeLM"
    assert result["test_metrics"]["mrpc"]["loss"] == pytest.approx(trained["test_metrics"]["mrpc"]["loss"], rel=1e-5)
    assert (folder / "trainer_state.json").is_file() and not (folder / "training_state.json").exists()
    # --overwrite retrains and replaces it
    train_main([*args, "--overwrite"])
    assert (folder / "training_state.json").is_file() and not (folder / "trainer_state.json").exists()
    # our checkpoint is reused by the same settings only: another cap or epoch count is refused, never reported
    assert train_main(args)[0]["training"]["written_by"] == "train_plms_glue.py"
    expect_exit(train_main, [*args[:3], "2", *args[4:]], capsys, str(folder), "num_epochs = 1", "asks for 2",
                "--overwrite", code=2)
    expect_exit(train_main, [*args, "--max_train_samples", "8"], capsys, "max_train_samples = None", code=2)


def test_drop_sweep_with_batch_and_aggregation(ws, tmp_path, monkeypatch):
    """A drop-rate sweep of inference_plms_glue.py (batched: one process per variant) and its aggregation."""
    import yaml

    from utils.aggregation import aggregate
    from utils.sweeps import RunOptions, plan, run

    monkeypatch.chdir(tmp_path)
    save = tmp_path / "sweep_save"
    save.mkdir()
    (save / "save_models").symlink_to(ws.save / "save_models", target_is_directory=True)
    fixed = {"language_model_name": str(ws.lm), "glue_dir": str(ws.glue), "device": "cpu", "no_progress": True, "learning_rate": 0.001,
             "save_dir": str(save), "dataset_names": ["mrpc"]}  # ws.common[:-2] as flags
    spec = {"name": "tiny_drop", "script": "inference_plms_glue.py", "output_root": "sweeps", "fixed": fixed,
            "axes": {"variant": {"labels": ["DARE", "DropOnly"], "zip": {"use_weight_rescale": [True, False]}},
                     "weight_mask_rate": [0.0, 0.5, 0.9]},
            "seeds": [0, 1], "exclude": [{"weight_mask_rate": 0.0, "variant": "DropOnly"}],
            "batch": {"weight_mask_rate": "weight_mask_rates", "seed": "seeds"}}
    path = tmp_path / "tiny_drop.yml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    result = run(path, RunOptions(workers=1))
    assert result.counts() == {"done": 10, "failed": 0, "pending": 0, "running": 0, "interrupted": 0}
    assert sorted(item.record["block_size"] for item in result.settings) == [4] * 4 + [6] * 6  # 2 calls
    # each call streamed its progress to its log: every evaluation's batches, and which of the call's parts ran
    log = Path(next(item.record["log"] for item in result.settings if item.record["block_size"] == 6)).read_text()
    assert "progress: test mrpc 1/4 batches (25%)" in log and "; part 1/6 (mrpc), call ETA" in log, log
    assert not any((item.setting.folder / "sweep_progress.json").exists() for item in result.settings)
    assert plan(path).counts()["done"] == 10
    outputs = aggregate([save], tmp_path / "summary")
    groups = [g for g in outputs.groups if g["is_main"] and g["kind"] == "drop"]
    dare = next(g for g in groups if g["variant"] == "DARE" and g["drop_rate"] == 0.5)
    assert dare["n"] == 2 and dare["seeds"] == [0, 1]
    single = inference_main(["--dataset_names", "mrpc", "--use_weight_rescale", "--weight_mask_rate", "0.5", "--seed", "1",
                             "--save_dir", str(ws.save), *ws.common[:-2]])[0]
    swept = [r["value"] for r in outputs.rows if (r["variant"], r["drop_rate"], r["seed"], r["metric"]) == ("DARE", 0.5, 1, "averaged_scores")]
    assert swept == [single["metrics"]["test"]["averaged_scores"]]
    assert "| DropOnly |" in (tmp_path / "summary" / "tables.md").read_text() and (tmp_path / "summary" / "drop_rate.png").is_file()


def test_train_refuses_a_checkpoint_folder_that_overlaps_the_pretrained_model(ws, tmp_path, capsys):
    """Even with --overwrite: replacing the checkpoint folder would delete (or write into) the model it trains."""
    inside = shutil.copytree(ws.lm, tmp_path / "save_models" / "mrpc" / NAME / ws.lm.name)   # the checkpoint folder holds it
    holder = shutil.copytree(ws.lm, tmp_path / "holder" / ws.lm.name)                        # --save_dir inside the model
    for model, save in ((inside, tmp_path), (holder, holder)):
        before = sorted(p.relative_to(model) for p in model.rglob("*"))
        args = ["--dataset_name", "mrpc", "--num_epochs", "1", "--num_runs", "1", "--save_dir", str(save), *ws.common,
                "--language_model_name", str(model), "--overwrite"]
        expect_exit(train_main, args, capsys, "overlaps --language_model_name", "--save_dir", code=2)
        assert sorted(p.relative_to(model) for p in model.rglob("*")) == before


def test_train_removes_the_trainer_folders_of_killed_runs_only(ws, tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                                  # a pid that no longer exists
    parent = tmp_path / "save_models" / "mrpc"
    stale, alive = parent / f".{NAME}.trainer-{dead.pid}", parent / f".{NAME}.trainer-1"   # pid 1 always exists
    for folder in (stale, alive):
        (folder / "checkpoint-1").mkdir(parents=True)
    train_main(["--dataset_name", "mrpc", "--num_epochs", "1", "--num_runs", "1", "--save_dir", str(tmp_path),
                *ws.common])
    assert not stale.exists() and (alive / "checkpoint-1").is_dir()
    assert (parent / NAME / "training_state.json").is_file()
    assert sorted(p.name for p in parent.iterdir()) == sorted([NAME, alive.name])   # its own work folder is gone too


KILL_AFTER_FIRST_EPOCH = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
from transformers import TrainerCallback
import utils.glue.training as training
from train_plms_glue import main

original = training.make_trainer_class


class KillAfterSave(TrainerCallback):          # SIGKILL once the first epoch checkpoint is on disk
    def on_save(self, args, state, control, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)


def killing_trainer_class():
    base = original()

    class Killing(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(KillAfterSave())
    return Killing


training.make_trainer_class = killing_trainer_class
main(sys.argv[1:])
"""


def test_a_killed_training_resumes_from_its_last_epoch_checkpoint(ws, tmp_path, capsys):
    """SIGKILL right after epoch 1's checkpoint: the rerun resumes at that step (global_step continues, the log
    keeps epoch 1) and ends with the same weights as the uninterrupted 2-epoch run of the ws fixture; a rerun
    with other settings is refused until --overwrite; the work folder goes once the checkpoint is published."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    argv = ["--dataset_name", "mrpc", "--num_epochs", "2", "--num_runs", "1", "--save_dir", str(tmp_path), *ws.common]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_EPOCH, *argv], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    parent = tmp_path / "save_models" / "mrpc"
    work = parent / f".{NAME}.trainer"
    steps_per_epoch = -(-94 // 16)                               # 94 train pairs, batch 16
    assert [p.name for p in work.glob("checkpoint-*")] == [f"checkpoint-{steps_per_epoch}"]
    assert not (parent / NAME).exists()                          # nothing published by the killed run

    expect_exit(train_main, [*argv[:3], "3", *argv[4:]], capsys, str(work), "changed: num_epochs", "--overwrite", code=2)
    assert (work / f"checkpoint-{steps_per_epoch}").is_dir()     # the refusal leaves the checkpoints alone

    result = train_main(argv)[0]
    assert "resuming from" in capsys.readouterr().out
    assert result["training"]["resumed_from_step"] == steps_per_epoch and result["training"]["total_steps"] == 2 * steps_per_epoch
    assert [epoch["step"] for epoch in result["training"]["history"]] == [steps_per_epoch, 2 * steps_per_epoch]
    assert not work.exists() and (parent / NAME / "training_state.json").is_file()
    resumed = load_file(parent / NAME / "model.safetensors")
    uninterrupted = load_file(ws.save / "save_models" / "mrpc" / NAME / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_overwrite_starts_afresh_when_the_settings_changed(ws, tmp_path):
    from utils.glue.training import RESUME_SETTINGS_FILE

    work = tmp_path / "save_models" / "rte" / f".{NAME}.trainer"
    stale = work / "checkpoint-3"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (work / RESUME_SETTINGS_FILE).write_text(json.dumps({"num_epochs": 7}))
    result = train_main(["--dataset_name", "rte", "--num_epochs", "1", "--num_runs", "1", "--save_dir", str(tmp_path),
                         "--overwrite", *ws.common])[0]
    assert result["training"]["resumed_from_step"] is None and not work.exists()


def test_training_reports_its_trainer_steps_to_a_sweeps_progress_file(ws, tmp_path, monkeypatch, capsys):
    """Issue 26 item 1: under a sweep (MERGELM_PROGRESS set) the Trainer's steps go to the progress file and log."""
    import re

    progress_file = tmp_path / "sweep_progress.json"
    monkeypatch.setenv("MERGELM_PROGRESS", str(progress_file))
    train_main(["--dataset_name", "rte", "--num_epochs", "2", "--num_runs", "1", "--save_dir", str(tmp_path), *ws.common])
    err = capsys.readouterr().err
    first = re.search(r"progress: train rte 1/(\d+) steps", err)
    assert first, err
    total = int(first.group(1))
    assert f"progress: train rte {total}/{total} steps (100%)" in err
    state = json.loads(progress_file.read_text())
    assert state["schema"] == "mergelm.progress/1" and state["step"] == state["total"] > 0   # the last stage ended


def test_the_main_jobs_merge_table_runs_each_method_once_without_and_with_dare(ws, tmp_path):
    """The quick chain (configs/sweeps/glue_quick_merge*.yml, grid "quick"): one setting per method, then DARE at
    p = 0.9 on top of it (read from the method's result file of the same grid), for every method the sweeps list."""
    root = Path(__file__).resolve().parents[1] / "configs" / "sweeps"
    plain = yaml.safe_load((root / "glue_quick_merge.yml").read_text())
    dare = yaml.safe_load((root / "glue_quick_merge_dare.yml").read_text())
    methods = plain["axes"]["merging_method_name"]
    assert methods == dare["axes"]["mask_apply_method"] and plain["fixed"]["merge_grid"] == dare["fixed"]["merge_grid"] == "quick"
    for name in ("mrpc", "stsb"):
        shutil.copytree(ws.save / "save_models" / name / NAME, tmp_path / "save_models" / name / NAME)
    base = ["--dataset_names", "mrpc", "stsb", "--merge_grid", "quick", "--save_dir", str(tmp_path), *ws.common[:-2]]
    for method in methods:
        result = merge_main(["--merging_method_name", method, *base])[0]
        assert len(result["settings"]) == 1
        merged = merge_main(["--merging_method_name", "mask_merging", "--mask_apply_method", method, "--use_weight_rescale", *base])[0]
        assert [s["weight_mask_rate"] for s in merged["settings"]] == [0.9]
        assert {key: value for key, value in merged["settings"][0]["setting"].items() if key != "weight_mask_rate"} == \
            result["settings"][0]["setting"]
        assert (tmp_path / "save_merge_results" / "mrpc_stsb" / "mask_merging" / method / "tiny-bert_grid_quick.json").is_file()
    # the sweeps run the methods in one process each (batch: --merging_method_names / --mask_apply_methods):
    # every method's result file is the one its own run writes
    assert plain["batch"] == {"merging_method_name": "merging_method_names"} and dare["batch"] == {"mask_apply_method": "mask_apply_methods"}
    batched = tmp_path / "batched"
    shutil.copytree(tmp_path / "save_models", batched / "save_models")
    flags = ["--dataset_names", "mrpc", "stsb", "--merge_grid", "quick", "--save_dir", str(batched), *ws.common[:-2]]
    runs = merge_main(["--merging_method_names", *methods, *flags])
    runs += merge_main(["--merging_method_name", "mask_merging", "--mask_apply_methods", *methods, "--use_weight_rescale", *flags])
    folders = [*methods, *(f"mask_merging/{method}" for method in methods)]
    assert len(runs) == len(folders)
    for run, folder in zip(runs, folders):
        alone = json.loads((tmp_path / "save_merge_results" / "mrpc_stsb" / folder / "tiny-bert_grid_quick.json").read_text())
        written = json.loads((batched / "save_merge_results" / "mrpc_stsb" / folder / "tiny-bert_grid_quick.json").read_text())
        untimed = lambda winners: {c: {k: v for k, v in w.items() if k != "timing"} for c, w in winners.items()}
        assert untimed(written["winners"]) == untimed(alone["winners"]) == untimed(run["winners"]), folder
        same = lambda config: {k: v for k, v in config.items() if k not in ("save_dir", "checkpoints")}
        assert same(written["config"]) == same(alone["config"]), folder


def test_batched_methods_refusals(ws, tmp_path, capsys):
    base = ["--dataset_names", "mrpc", "stsb", "--merge_grid", "quick", "--save_dir", str(tmp_path), *ws.common[:-2]]
    expect_exit(merge_main, ["--merging_method_names", "task_arithmetic", "task_arithmetic", *base], capsys, "names a method twice", code=2)
    expect_exit(merge_main, ["--mask_apply_methods", "task_arithmetic", *base], capsys, "needs --merging_method_name mask_merging", code=2)
    expect_exit(merge_main, ["--merging_method_name", "mask_merging", "--merging_method_names", "task_arithmetic", *base], capsys,
                "use --mask_apply_methods", code=2)
    expect_exit(merge_main, ["--merging_method_names", "no_such_method", *base], capsys, "invalid choice", code=2)
    assert not (tmp_path / "save_merge_results").exists()
