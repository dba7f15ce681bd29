"""The six-task GLUE merging benchmark (scripts/glue_multitask_benchmark.py) end to end on a tiny random BERT
and slices of the real GLUE files (three tasks, two methods ± DARE with three mask seeds), its QQP split
rule, its constant baselines, the merge search's new options and the normalised tables' arithmetic."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from glue_helpers import glue_slice, require_glue_dir, tiny_bert
from utils.aggregation.multitask import MultitaskGroup
from utils.glue.data import load_glue_config
from utils.glue.multitask import QQP_DEV_MODULUS, constant_baselines, prepare_glue_dir, split_qqp_rows

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from glue_multitask_benchmark import main as benchmark_main  # noqa: E402

TASKS = ["sst2", "mrpc", "qqp"]   # accuracy-based: a tiny random model scores above 0, so ratios exist


def qqp_slice(glue: Path, lines: int = 200) -> None:
    source = require_glue_dir() / "QQP" / "new_dev.tsv"
    (glue / "QQP").mkdir(parents=True, exist_ok=True)
    with open(source, encoding="utf-8", newline="") as reader:
        (glue / "QQP" / "new_dev.tsv").write_text("".join(line for _, line in zip(range(lines), reader)), encoding="utf-8")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    base = tmp_path_factory.mktemp("multitask")
    glue = glue_slice(base)
    qqp_slice(glue)
    model = tiny_bert(base, glue).rename(base / "all-MiniLM-L6-v2")   # the name picks the checkpoints' learning rate
    argv = ["--root", str(base / "root"), "--glue_dir", str(glue), "--model", str(model), "--tasks", *TASKS,
            "--methods", "average_merging", "task_arithmetic", "--max_train_samples", "24", "--num_epochs", "1",
            "--max_eval_samples", "20"]
    assert benchmark_main(argv) == 0
    return base / "root", argv, glue


def result_files(root: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in (root / "experts").rglob("*.json")}


def test_benchmark_end_to_end(bench):
    root, argv, _ = bench
    done = json.loads((root / "experts" / "DONE").read_text())
    assert done["tasks"] == TASKS and all(Path(path, "training_state.json").is_file() for path in done["checkpoints"].values())
    summary = root / "summary"
    for name in ("tables.md", "tables.tex", "results_tidy.csv", "methods.json",
                 "merge_normalized_all-MiniLM-L6-v2_3tasks.png", "merge_heatmap_all-MiniLM-L6-v2_3tasks.png",
                 "merge_normalized_all-MiniLM-L6-v2_3tasks.sources.txt"):
        assert (summary / name).is_file(), name
    methods = json.loads((summary / "methods.json").read_text())
    assert set(methods["used"]) >= {"average_merging", "task_arithmetic"}
    assert set(methods["used"]) | set(methods["skipped"]) == {"average_merging", "task_arithmetic"}   # as asked

    # the normalised average of task arithmetic + DARE, recomputed from the result files, is the table's
    merges = root / "experts" / "save_merge_results" / "sst2_mrpc_qqp" / "mask_merging" / "task_arithmetic"
    payloads = sorted(merges.glob("all-MiniLM-L6-v2_grid_multitask*.json"))
    assert [p.name for p in payloads] == ["all-MiniLM-L6-v2_grid_multitask.json", "all-MiniLM-L6-v2_grid_multitask_seed_1.json",
                                          "all-MiniLM-L6-v2_grid_multitask_seed_2.json"]
    individual = {}
    for task in TASKS:
        result = next((root / "experts" / "save_model_results" / task).rglob("*.json"))
        payload = json.loads(result.read_text())
        row = load_glue_config()["tasks"][task]
        individual[task] = payload["test_metrics"][task][row["main_metric"]]
    normalised = []
    for path in payloads:
        payload = json.loads(path.read_text())
        assert list(payload["winners"]) == ["mean"]                  # --winners mean: one merged model
        scores = payload["winners"]["mean"]["test_scores"]
        normalised.append(np.mean([scores[t] / individual[t] for t in TASKS]))
    expected = f"{100 * np.mean(normalised):.2f} ± {100 * np.std(normalised, ddof=1):.2f}"
    table = (summary / "tables.md").read_text()
    line = next(l for l in table.splitlines() if l.startswith("| Task Arithmetic + DARE |") and "normalised" not in l
                and l.count("|") == len(TASKS) + 4)
    assert line.split("|")[-3].strip() == expected
    assert "best constant prediction" in table


def test_rerun_is_resumed_without_recomputing(bench, capsys):
    root, argv, _ = bench
    before = result_files(root)
    assert benchmark_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count(" 0 to run") == 3                              # train, merge, dare: nothing rerun
    after = result_files(root)
    assert [p for p in before if after[p] != before[p]] == []


def test_qqp_split_rule(tmp_path):
    glue = tmp_path / "shared"
    qqp_slice(glue, lines=400)
    folder = prepare_glue_dir(glue, tmp_path / "data", ["qqp"])
    train, dev = split_qqp_rows(glue / "QQP" / "new_dev.tsv")
    assert len(train) + len(dev) == 400 and dev
    assert all(int(row[0]) % QQP_DEV_MODULUS == 0 for row in dev) and all(int(row[0]) % QQP_DEV_MODULUS for row in train)
    assert (folder / "QQP" / "dev.tsv").read_text().count("\n") == len(dev)
    assert "not comparable to GLUE QQP dev" in (folder / "QQP" / "SPLIT.md").read_text()
    prepare_glue_dir(glue, tmp_path / "data", ["qqp"])                # a second call reuses the folder


def test_constant_baselines_are_the_best_constant_prediction(tmp_path):
    glue = glue_slice(tmp_path)
    config = load_glue_config()
    baselines = constant_baselines(config, glue, ["cola", "sst2", "stsb"])
    assert baselines["cola"]["metrics"]["matthews_correlation"] == 0.0
    with open(glue / "SST-2" / "dev.tsv", encoding="utf-8", newline="") as handle:
        labels = [int(row[-1]) for row in list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:] if row]
    assert baselines["sst2"]["metrics"]["accuracy"] == pytest.approx(max(np.mean(labels), 1 - np.mean(labels)))
    assert baselines["stsb"]["metrics"]["averaged_scores"] == 0.0


def test_normalised_table_arithmetic():
    def row(kind, task, tasks, value, seed=0, method="fine-tuned", dare=False, source="a", split="test", metric="m", main=True):
        return {"kind": kind, "model": "m", "task": task, "tasks": tasks, "value": value, "seed": seed, "method": method, "dare": dare,
                "source": source, "split": split, "metric": metric, "is_main": main, "setting": "s", "domain": "glue"}

    tasks = ["a", "b", "c"]
    rows = [row("finetune", t, t, v, source=f"ft_{t}") for t, v in zip(tasks, (0.8, 0.5, 0.4))]
    for seed, values in ((0, (0.4, 0.5, 0.2)), (1, (0.8, 0.25, 0.4))):
        rows += [row("merge", t, "a+b+c", v, seed=seed, method="x", dare=True, source=f"m{seed}") for t, v in zip(tasks, values)]
    group = MultitaskGroup(rows, "m", tasks, "test")
    (run0, run1) = sorted(group.per_seed(("x", True)), key=lambda r: r["seed"])
    assert run0["normalised"] == pytest.approx([0.5, 1.0, 0.5]) and run1["normalised"] == pytest.approx([1.0, 0.5, 1.0])
    table = group.normalised_table()
    assert table.rows[1][-2] == f"{100 * np.mean([2 / 3, 5 / 6]):.2f} ± {100 * np.std([2 / 3, 5 / 6], ddof=1):.2f}"
    assert table.rows[1][1] == "75.00 ± 35.36"


def test_merge_search_options_for_the_benchmark(bench, tmp_path):
    """--max_validation_samples caps validation only, --eval_batch_size leaves scores unchanged, --seeds runs
    one search per seed (named in mask_merging's files), --winners mean selects one merged model."""
    import shutil

    from merge_plms_glue import main as merge_main

    root, _, _ = bench
    shutil.copytree(root / "experts" / "save_models", tmp_path / "save_models")
    common = ["--language_model_name", str(root / "all-MiniLM-L6-v2"), "--glue_dir", str(root / "glue_data"), "--save_dir", str(tmp_path),
              "--dataset_names", *TASKS, "--device", "cpu", "--no_progress", "--merge_grid", "none", "--winners", "mean"]
    small = merge_main([*common, "--merging_method_name", "task_arithmetic", "--scaling_coefficient", "0.5", "--max_validation_samples", "7"])[0]
    assert {t: n["validation"] for t, n in small["num_examples"].items()} == {t: 7 for t in TASKS}
    from utils.glue.data import load_task_splits

    config = load_glue_config()
    assert {t: n["test"] for t, n in small["num_examples"].items()} == \
        {t: len(load_task_splits(t, config, root / "glue_data", splits=("test",))["test"]) for t in TASKS}   # test uncapped
    assert list(small["winners"]) == ["mean"] and set(small["settings"][0]["timing"]) >= {"merge_time_s", "dare_time_s"}
    batched = merge_main([*common, "--merging_method_name", "task_arithmetic", "--scaling_coefficient", "0.5", "--max_validation_samples", "7",
                          "--eval_batch_size", "3"])[0]
    assert batched["winners"]["mean"]["test_scores"] == pytest.approx(small["winners"]["mean"]["test_scores"])
    runs = merge_main([*common, "--merging_method_name", "mask_merging", "--mask_apply_method", "task_arithmetic", "--scaling_coefficient", "0.5",
                       "--weight_mask_rate", "0.5", "--use_weight_rescale", "--max_validation_samples", "7", "--seeds", "0", "3"])
    assert [run["config"]["seed"] for run in runs] == [0, 3]
    losses = [[run["winners"]["mean"]["test_metrics"][t]["loss"] for t in TASKS] for run in runs]
    assert losses[0] != losses[1]                                                   # other masks, other merged weights
    folder = tmp_path / "save_merge_results" / "_".join(TASKS) / "mask_merging" / "task_arithmetic"
    assert sorted(p.name for p in folder.glob("*.json")) == ["all-MiniLM-L6-v2_grid_none.json", "all-MiniLM-L6-v2_grid_none_seed_3.json"]


@pytest.mark.parametrize("method", ["tsv_merging", "iso_c", "iso_cts", "wudi_merging", "cart", "consensus_merging", "lines",
                                    "pcb_merging", "breadcrumbs", "della"])
def test_registry_parameter_methods_run_in_the_search(bench, tmp_path, method):
    """Every registry method of the benchmark's grid runs through merge_plms_glue.py with its grid's parameters."""
    import shutil

    from merge_plms_glue import main as merge_main
    from utils.glue.cli import registry_methods

    if method not in registry_methods():
        pytest.skip(f"{method} is not in the registry")
    root, _, _ = bench
    shutil.copytree(root / "experts" / "save_models", tmp_path / "save_models")
    payload = merge_main(["--language_model_name", str(root / "all-MiniLM-L6-v2"), "--glue_dir", str(root / "glue_data"),
                          "--save_dir", str(tmp_path), "--dataset_names", *TASKS, "--device", "cpu", "--no_progress",
                          "--merge_grid", "multitask", "--winners", "mean", "--max_eval_samples", "6", "--merging_method_name", method])[0]
    grid = load_glue_config()["merge_grids"]["multitask"][method]
    assert len(payload["settings"]) == int(np.prod([len(values) for values in grid.values()]))
    assert all(np.isfinite(payload["winners"]["mean"]["test_scores"][t]) for t in TASKS)
    if method == "lines":   # β scales the deeper blocks: each grid value merges other weights (not average merging)
        losses = [tuple(record["selection_metrics"][t]["loss"] for t in TASKS) for record in payload["settings"]]
        assert len(set(losses)) == len(losses) == len(grid["beta"])
