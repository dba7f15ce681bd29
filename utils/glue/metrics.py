"""GLUE metrics (scikit-learn / scipy), as HF ``evaluate``'s ``glue`` metric computes them.

Per task:
  CoLA: Matthews correlation MCC = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)).
  SST-2, QNLI, RTE, MNLI (matched): accuracy = mean(prediction == label).
  MRPC, QQP: accuracy and F1 = 2·P·R / (P + R) of the positive class 1.
  STS-B: Pearson r and Spearman ρ between the predicted and gold scores.
Main number (the paper's rule): when a task has more than one metric, ``averaged_scores`` = their
arithmetic mean (MRPC/QQP: (accuracy + F1) / 2; STS-B: (Pearson + Spearman) / 2); otherwise the single
metric. Models are selected on this number and it is what the paper's tables report (as a percentage).
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

METRIC_FUNCTIONS = {
    "matthews_correlation": lambda pred, gold: matthews_corrcoef(gold, pred),
    "accuracy": lambda pred, gold: accuracy_score(gold, pred),
    "f1": lambda pred, gold: f1_score(gold, pred),
    "pearson": lambda pred, gold: pearsonr(pred, gold)[0],
    "spearmanr": lambda pred, gold: spearmanr(pred, gold)[0],
}


def predictions_from_logits(logits: np.ndarray, num_labels: int) -> np.ndarray:
    """Class ids (argmax over the first ``num_labels`` columns), or the score column for regression."""
    logits = np.asarray(logits)
    if num_labels == 1:
        return logits.reshape(len(logits), -1)[:, 0].astype(np.float64)
    return logits[:, :num_labels].argmax(axis=-1)


def compute_metrics(metric_names: list[str], predictions, labels) -> dict[str, float]:
    """The named metrics, plus ``averaged_scores`` (their mean) when there is more than one.

    A constant prediction or label vector makes Pearson/Spearman undefined; they are reported as 0.0
    (scipy returns NaN), so model selection still works.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape[0] != labels.shape[0]:
        raise ValueError(f"{predictions.shape[0]} predictions for {labels.shape[0]} labels")
    if labels.shape[0] == 0:
        raise ValueError("no examples to score")
    result = {}
    for name in metric_names:
        if name not in METRIC_FUNCTIONS:
            raise ValueError(f"unknown GLUE metric '{name}'; known: {', '.join(METRIC_FUNCTIONS)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = float(METRIC_FUNCTIONS[name](predictions, labels))
        result[name] = 0.0 if np.isnan(value) else value
    if len(metric_names) > 1:
        result["averaged_scores"] = float(np.mean([result[name] for name in metric_names]))
    return result


def task_metrics(task_row: dict, logits, labels) -> dict[str, float]:
    """Metrics of one task (``task_row`` = the config's task-table row) from model logits."""
    return compute_metrics(task_row["metrics"], predictions_from_logits(logits, task_row["num_labels"]), labels)


def main_score(task_row: dict, metrics: dict[str, float]) -> float:
    """The task's main number (see the module docstring)."""
    return float(metrics[task_row["main_metric"]])
