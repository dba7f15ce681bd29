"""scripts/aggregate_results.py on hand-written result files with known means and standard deviations."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from utils.aggregation import aggregate, collect, group_rows, variant_name

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "aggregate_results.py"


def write(path: Path, payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def glue_drop(root: Path, rate: float, seed: int, accuracy: float, f1: float, rescale=True, strategy="random",
              weight_format="delta_weight") -> Path:
    name = f"lm_drop_{rate}_{rescale}_{strategy}_{weight_format}_{seed}"
    config = {"language_model_name": "some/dir/tiny-bert", "task": "mrpc", "weight_mask_rate": rate, "use_weight_rescale": rescale,
              "mask_strategy": strategy, "weight_format": weight_format, "seed": seed}
    metrics = {"accuracy": accuracy, "f1": f1, "averaged_scores": (accuracy + f1) / 2, "loss": 0.5}
    return write(root / "save_model_results" / "mrpc" / name / f"{name}.json",
                 {"script": "inference_plms_glue.py", "config": config, "metrics": {"test": metrics}})


def glue_merge(root: Path, method: str, dare: bool, seed: int, scores: dict) -> Path:
    config = {"language_model_name": "tiny-bert", "tasks": ["mrpc", "rte"], "merging_method_name": "mask_merging" if dare else method,
              "base_method": method, "use_weight_rescale": True, "mask_strategy": "random", "weight_format": "delta_weight", "seed": seed}
    winner = {"weight_mask_rate": 0.5 if dare else 0.0,
              "test_metrics": {"mrpc": {"accuracy": scores["mrpc"], "f1": scores["mrpc"], "averaged_scores": scores["mrpc"]},
                               "rte": {"accuracy": scores["rte"]}},
              "test_scores": {**scores, "mean": (scores["mrpc"] + scores["rte"]) / 2}}
    folder = root / "save_merge_results" / "mrpc_rte" / ("mask_merging" if dare else method) / (method if dare else "")
    path = write(folder / f"tiny-bert_seed{seed}.json", {"script": "merge_plms_glue.py", "config": config, "winners": {"mean": winner}})
    write(folder / f"tiny-bert_seed{seed}_settings" / "default.json", {"config": config, "selection_scores": {}})
    return path


@pytest.fixture()
def results(tmp_path):
    root = tmp_path / "runs"
    dare_accuracy = {0: 0.80, 1: 0.70, 2: 0.75}  # mean 0.75, sample std 0.05
    for seed, accuracy in dare_accuracy.items():
        glue_drop(root, 0.9, seed, accuracy, accuracy)
        glue_drop(root, 0.9, seed, accuracy - 0.2, accuracy - 0.2, rescale=False)
        glue_drop(root, 0.0, seed, 0.85, 0.85)
    glue_drop(root, 0.9, 0, 0.40, 0.40, rescale=False, strategy="magnitude")
    glue_drop(root, 0.5, 0, 0.82, 0.84)
    for seed, (plain, dare) in enumerate([(0.60, 0.70), (0.62, 0.74)]):
        glue_merge(root, "task_arithmetic", False, seed, {"mrpc": plain, "rte": plain - 0.1})
        glue_merge(root, "task_arithmetic", True, seed, {"mrpc": dare, "rte": dare - 0.1})
    train = {"script": "train_plms_glue.py", "config": {"language_model_name": "tiny-bert", "tasks": ["rte"]},
             "seeds": {"run_seed": 42}, "test_metrics": {"rte": {"accuracy": 0.66}}, "validation_metrics": {"rte": {"accuracy": 0.7}}}
    write(root / "save_model_results" / "rte" / "tiny-bert_lr1e-05" / "tiny-bert_lr1e-05.json", train)
    llm = {"dataset": "gsm8k", "metrics": {"num_examples": 10, "accuracy": 0.3, "num_correct": 3}, "seed": 0,
           "config": {"arguments": {"finetuned_model_name": "WizardMath-7B-V1.0", "weight_mask_rate": 0.9, "use_weight_rescale": True,
                                    "mask_strategy": "random", "weight_format": "delta_weight", "seed": 0}}}
    write(root / "save_gen_math_results" / "gsm8k" / "WizardMath-7B-V1.0_inference_mask_0.9_rescale_True" / "summary.json", llm)
    write(root / "save_gen_math_results" / "gsm8k" / "x" / "records.json", [1, 2])  # not a summary: not read
    write(root / "save_model_results" / "mrpc" / "odd" / "odd.json", {"hello": "world"})  # different schema
    return root


def test_variant_names():
    assert variant_name(0.0, True, "random", "delta_weight") == "fine-tuned"
    assert variant_name(0.9, True, "random", "delta_weight") == "DARE"
    assert variant_name(0.9, False, "random", "delta_weight") == "DropOnly"
    assert variant_name(0.9, False, "magnitude", "delta_weight") == "magnitude"
    assert variant_name(0.9, True, "random", "finetuned_weight") == "fine-tuned weights"


def test_groups_have_known_means_and_stds(results):
    collector = collect([results])
    assert any("odd.json" in w and "different schema" in w for w in collector.warnings)
    assert not any("records.json" in w or "_settings" in w for w in collector.warnings)
    groups = group_rows(collector.rows)

    def one(**where):
        found = [g for g in groups if all(g[k] == v for k, v in where.items())]
        assert len(found) == 1, (where, found)
        return found[0]

    dare = one(domain="glue", kind="drop", variant="DARE", drop_rate=0.9, metric="accuracy")
    assert dare["n"] == 3 and dare["mean"] == pytest.approx(0.75) and dare["std"] == pytest.approx(0.05)
    assert dare["seeds"] == [0, 1, 2] and len(dare["sources"]) == 3
    drop_only = one(kind="drop", variant="DropOnly", drop_rate=0.9, metric="averaged_scores")
    assert drop_only["mean"] == pytest.approx(0.55) and drop_only["std"] == pytest.approx(0.05) and drop_only["is_main"]
    assert one(kind="drop", variant="fine-tuned", metric="averaged_scores")["std"] == 0.0
    merge = one(kind="merge", method="task_arithmetic", dare=True, task="average")
    values = np.array([0.70 + 0.60, 0.74 + 0.64]) / 2
    assert merge["mean"] == pytest.approx(values.mean()) and merge["std"] == pytest.approx(values.std(ddof=1))
    assert one(kind="drop", domain="llm", metric="accuracy")["mean"] == pytest.approx(0.3)
    assert one(kind="finetune", task="rte", split="test")["mean"] == pytest.approx(0.66)


def test_aggregate_writes_tables_figures_and_tidy_files(results, tmp_path):
    out = tmp_path / "summary"
    outputs = aggregate([results], out, figure_metric="loss")
    for name in ("results_tidy.csv", "results_tidy.jsonl", "results_groups.csv", "tables.md", "tables.tex", "drop_rate.png",
                 "merge.png", "drop_rate_loss.png", "drop_rate.sources.txt", "merge.sources.txt", "skipped.txt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "drop_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "results_tidy.csv", encoding="utf-8") as handle:
        tidy = list(csv.DictReader(handle))
    assert len(tidy) == len(outputs.rows) == sum(1 for _ in open(out / "results_tidy.jsonl"))
    markdown = (out / "tables.md").read_text()
    # drop-rate table of mrpc: the DARE row at p = 0.9 is (0.75 ± 0.05) × 100 on averaged_scores
    assert "| DARE | 85.00 ± 0.00 | 83.00 | 75.00 ± 5.00 |" in markdown
    assert "| DropOnly | 85.00 ± 0.00 | – | 55.00 ± 5.00 |" in markdown
    assert "| Task Arithmetic + DARE (p = 0.5) | 72.00 ± 2.83 | 62.00 ± 2.83 | 67.00 ± 2.83 |" in markdown
    assert "| fine-tuned (rte) | – | 66.00 | – |" in markdown and "fine-tuned (mrpc)" not in markdown  # no mrpc training record
    assert "DARE vs DropOnly vs magnitude" in markdown and "| tiny-bert | mrpc | 0.9 | 85.00 ± 0.00 | 75.00 ± 5.00 | 55.00 ± 5.00 | 40.00 |" in markdown
    sources = (out / "drop_rate.sources.txt").read_text().splitlines()
    assert len(sources) == 12 and all(Path(s).is_file() for s in sources)  # GLUE: 3 × 3 seeds + magnitude + p = 0.5; LLM: 1
    assert "\\begin{tabular}" in (out / "tables.tex").read_text() and "% source:" in (out / "tables.tex").read_text()
    assert "odd.json" in (out / "skipped.txt").read_text()


def test_aggregate_script_warns_about_other_schemas(results, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("aggregate_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(results), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "odd.json" in err
    assert module.main([str(tmp_path / "empty_nothing"), "--out", str(tmp_path / "o2")]) == 2
