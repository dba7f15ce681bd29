"""Figures a reader trusts (utils/aggregation/figures.py, multitask.py): every score axis holds zero and the
lowest value drawn (CoLA's Matthews correlation and STS-B can be negative), labels in words, a reference
line at the fine-tuned model, per-task panels beside the average, one title. Asserted on the matplotlib
objects, captured as they are saved."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import utils.aggregation.figures as figures
from utils.aggregation import aggregate


def write(path: Path, payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def expert(root: Path, task: str, metrics: dict) -> None:
    payload = {"script": "train_plms_glue.py", "config": {"language_model_name": "tiny-bert", "tasks": [task]},
               "seeds": {"run_seed": 42}, "test_metrics": {task: metrics}, "validation_metrics": {task: metrics}}
    write(root / "save_model_results" / task / f"tiny-bert_{task}" / f"tiny-bert_{task}.json", payload)


def merge(root: Path, method: str, dare: bool, seed: int, cola: float, rte: float) -> None:
    config = {"language_model_name": "tiny-bert", "tasks": ["cola", "rte"], "base_method": method, "seed": seed,
              "merging_method_name": "mask_merging" if dare else method, "use_weight_rescale": True,
              "mask_strategy": "random", "weight_format": "delta_weight"}
    winner = {"weight_mask_rate": 0.9 if dare else 0.0,
              "test_metrics": {"cola": {"matthews_correlation": cola}, "rte": {"accuracy": rte}},
              "test_scores": {"cola": cola, "rte": rte, "mean": (cola + rte) / 2}}
    folder = root / "save_merge_results" / "cola_rte" / config["merging_method_name"] / (method if dare else "")
    write(folder / f"tiny-bert_seed{seed}.json", {"script": "merge_plms_glue.py", "config": config, "winners": {"mean": winner}})


def drop(root: Path, rate: float, seed: int, mcc: float, rescale: bool = True) -> None:
    name = f"lm_drop_{rate}_{rescale}_{seed}"
    config = {"language_model_name": "tiny-bert", "task": "cola", "weight_mask_rate": rate, "use_weight_rescale": rescale,
              "mask_strategy": "random", "weight_format": "delta_weight", "seed": seed}
    write(root / "save_model_results" / "cola" / name / f"{name}.json",
          {"script": "inference_plms_glue.py", "config": config, "metrics": {"test": {"matthews_correlation": mcc}}})


@pytest.fixture()
def saved(monkeypatch):
    """Every figure the aggregation saves, by file name (the figure object itself, before it is closed)."""
    found = {}
    real = figures._save

    def keep(figure, path, sources):
        found[Path(path).name] = figure
        return real(figure, path, sources)

    monkeypatch.setattr(figures, "_save", keep)
    return found


@pytest.fixture()
def results(tmp_path):
    root = tmp_path / "runs"
    expert(root, "cola", {"matthews_correlation": 0.30})
    expert(root, "rte", {"accuracy": 0.65})
    for seed, (plain, dared) in enumerate([(-0.12, 0.05), (-0.08, 0.07)]):    # merged CoLA below zero
        merge(root, "task_arithmetic", False, seed, plain, 0.60)
        merge(root, "task_arithmetic", True, seed, dared, 0.62)
    for seed in (0, 1):
        drop(root, 0.0, seed, 0.30)
        drop(root, 0.9, seed, 0.25 - 0.01 * seed)
        drop(root, 0.9, seed, -0.05 - 0.01 * seed, rescale=False)          # DropOnly below zero
    return root


def _axes(figure):
    return [axis for axis in figure.axes if axis.get_visible() and axis.get_ylabel()]


def test_merge_figure_shows_negative_scores_per_task_with_the_expert_line(results, tmp_path, saved):
    aggregate([results], tmp_path / "out")
    figure = saved["merge.png"]
    axes = _axes(figure)
    assert [axis.get_title().split(": ")[-1] for axis in axes] == ["average of the tasks", "COLA", "RTE"]
    for axis in axes:
        assert axis.get_ylabel() == "GLUE dev score ×100"
        assert "averaged_scores" not in axis.get_ylabel() and "mean_main" not in axis.get_ylabel()
        low, high = axis.get_ylim()
        assert low <= 0.0 <= high
    cola = axes[1]
    lowest = min(patch.get_y() + min(patch.get_height(), 0.0) for patch in cola.patches)
    assert lowest == pytest.approx(-10.0)                           # the mean of -12 and -8, drawn below zero
    assert cola.get_ylim()[0] < -10.0 - 2.0                          # its error bar (std 2.83) fits too
    references = {line.get_label(): line.get_ydata()[0] for axis in axes for line in axis.get_lines()
                  if line.get_linestyle() == "--"}
    per_panel = [[line for line in axis.get_lines() if line.get_linestyle() == "--"] for axis in axes]
    assert [len(lines) for lines in per_panel] == [1, 1, 1]
    assert per_panel[0][0].get_ydata()[0] == pytest.approx(100 * (0.30 + 0.65) / 2)   # mean of the experts
    assert per_panel[1][0].get_ydata()[0] == pytest.approx(30.0) and per_panel[2][0].get_ydata()[0] == pytest.approx(65.0)
    assert "fine-tuned experts (mean)" in references and "fine-tuned model" in references
    assert figure._suptitle is not None and figure._suptitle.get_text()
    assert all(text.get_text() != figure._suptitle.get_text() for axis in axes for text in [axis.title])


def test_drop_rate_figure_holds_negative_curves_and_the_fine_tuned_line(results, tmp_path, saved):
    aggregate([results], tmp_path / "out")
    figure = saved["drop_rate.png"]
    (axis,) = _axes(figure)
    assert axis.get_ylabel() == "GLUE dev score ×100" and axis.get_xlabel() == "drop rate p"
    drop_only = next(line for line in axis.get_lines() if line.get_label() == "DropOnly")
    assert min(drop_only.get_ydata()) == pytest.approx(-5.5)
    low, high = axis.get_ylim()
    assert low < -5.5 - 0.7 and high >= 30.0                         # the curve and its ± std band
    reference = next(line for line in axis.get_lines() if line.get_linestyle() == "--")
    assert reference.get_ydata()[0] == pytest.approx(30.0) and "fine-tuned" in reference.get_label()
    assert figure._suptitle.get_text().startswith("Dropping delta parameters")


def test_a_given_title_is_the_one_title(results, tmp_path, saved):
    aggregate([results], tmp_path / "out", figure_title="My run")
    for figure in saved.values():
        assert figure._suptitle.get_text() == "My run"
        assert not any(axis.get_title() == "My run" for axis in figure.axes)


@pytest.mark.parametrize("values, expected", [
    ([62.5, 70.0], (0.0, 70.0 * 1.06)),          # positive data: the axis starts at zero, not at 62.5
    ([-12.0, 30.0], (-12.0 - 0.06 * 42, 30.0 + 0.06 * 42)),
    ([-5.0, -1.0], (-5.0 - 0.3, 0.0)),
    ([float("nan")], (0.0, 1.0)),
    ([0.0, 0.0], (0.0, 1.0)),
])
def test_score_limits(values, expected):
    assert figures.score_limits(values) == pytest.approx(expected)


def test_labels_in_words():
    assert figures.score_label("glue", "test") == "GLUE dev score ×100"
    assert figures.score_label("glue", "validation", "f1", main=False) == "validation (10% of GLUE train) F1 ×100"
    assert figures.score_label("glue", "test", "loss", main=False) == "GLUE dev loss"
    assert figures.score_label("llm", "test", "accuracy", main=False) == "test accuracy ×100"
    assert figures.score_label("llm", "test", "answer_nll_per_token") == "test answer NLL per token"
