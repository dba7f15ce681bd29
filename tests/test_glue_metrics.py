"""GLUE metrics against values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from utils.glue.data import load_glue_config
from utils.glue.metrics import compute_metrics, main_score, predictions_from_logits, task_metrics

CONFIG = load_glue_config()


def test_matthews_correlation_by_hand():
    # TP = 2, TN = 2, FP = 1, FN = 1 -> (2·2 − 1·1) / sqrt(3·3·3·3) = 1/3
    metrics = compute_metrics(["matthews_correlation"], [1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0])
    assert metrics == {"matthews_correlation": pytest.approx(1 / 3)}


def test_accuracy_f1_and_averaged_scores():
    # TP = 3, FN = 1, FP = 1, TN = 1: accuracy 4/6, precision = recall = 3/4 -> F1 = 3/4
    metrics = compute_metrics(["accuracy", "f1"], [1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 0, 0])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["f1"] == pytest.approx(0.75)
    assert metrics["averaged_scores"] == pytest.approx((4 / 6 + 0.75) / 2)


def test_pearson_spearman_by_hand():
    # pred (1, 2, 3), gold (1, 2, 4): r = 3 / sqrt(2 · 42/9) = 9 / sqrt(84); Spearman = 1 (monotone)
    metrics = compute_metrics(["pearson", "spearmanr"], [1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert metrics["pearson"] == pytest.approx(9 / math.sqrt(84))
    assert metrics["spearmanr"] == pytest.approx(1.0)
    assert metrics["averaged_scores"] == pytest.approx((9 / math.sqrt(84) + 1.0) / 2)


def test_constant_prediction_gives_zero_correlation():
    metrics = compute_metrics(["pearson", "spearmanr"], [2.0, 2.0, 2.0], [1.0, 2.0, 4.0])
    assert metrics == {"pearson": 0.0, "spearmanr": 0.0, "averaged_scores": 0.0}


def test_main_score_rule_per_task():
    assert [CONFIG["tasks"][t]["main_metric"] for t in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")] == [
        "matthews_correlation", "accuracy", "averaged_scores", "averaged_scores", "averaged_scores", "accuracy", "accuracy", "accuracy"]
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    metrics = task_metrics(CONFIG["tasks"]["mrpc"], logits, np.array([1, 0, 0, 0]))
    # predictions (1, 0, 1, 0): accuracy 3/4, precision 1/2, recall 1 -> F1 2/3
    assert main_score(CONFIG["tasks"]["mrpc"], metrics) == pytest.approx((0.75 + 2 / 3) / 2)


def test_predictions_from_logits():
    assert predictions_from_logits(np.array([[0.0, 2.0, -1.0], [3.0, 0.0, 1.0]]), 3).tolist() == [1, 0]
    assert predictions_from_logits(np.array([[2.5], [0.5]]), 1).tolist() == [2.5, 0.5]


def test_bad_metric_inputs():
    with pytest.raises(ValueError, match="unknown GLUE metric 'bleu'"):
        compute_metrics(["bleu"], [1], [1])
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        compute_metrics(["accuracy"], [1, 0], [1, 0, 1])
