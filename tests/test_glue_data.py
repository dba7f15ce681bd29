"""Readers of the real GLUE files (with their quirks), splits and data errors."""
from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest

from glue_helpers import require_glue_dir
from utils.glue.data import (
    GlueDataError,
    load_glue_config,
    load_task_splits,
    read_local_split,
    resolve_glue_dir,
    split_train_validation,
)

CONFIG = load_glue_config()


def test_local_sizes_and_first_rows():
    glue = require_glue_dir()
    cola = read_local_split(glue, "cola", "train", CONFIG)
    assert len(cola) == 8551 and cola.text_b is None
    assert cola.text_a[0] == "Our friends won't buy this analysis, let alone the next one we propose."
    assert cola.labels[0] == 1
    mrpc = read_local_split(glue, "mrpc", "train", CONFIG)
    assert len(mrpc) == 3668 and int(mrpc.labels.sum()) == 2474  # GLUE's 3668, BOM stripped
    assert "Brandeis" in " ".join(mrpc.text_a)  # the pair the local train.tsv lacks
    mrpc_dev = read_local_split(glue, "mrpc", "test", CONFIG)
    assert len(mrpc_dev) == 408 and np.bincount(mrpc_dev.labels).tolist() == [129, 279]
    stsb = read_local_split(glue, "stsb", "test", CONFIG)
    assert len(stsb) == 1500 and stsb.labels.dtype == np.float32 and stsb.labels[0] == pytest.approx(5.0)
    mnli = read_local_split(glue, "mnli", "test", CONFIG)
    assert len(mnli) == 9815 and mnli.text_a[0] == "The new rights are nice enough"
    assert np.bincount(mnli.labels).tolist() == [3479, 3123, 3213]  # entailment, neutral, contradiction
    rte = read_local_split(glue, "rte", "test", CONFIG)
    assert len(rte) == 277 and rte.labels[0] == 1  # not_entailment


def test_bare_quotes_are_kept():
    glue = require_glue_dir()
    mrpc_dev = read_local_split(glue, "mrpc", "test", CONFIG)
    assert mrpc_dev.text_b[0].startswith('" The foodservice pie business')
    assert len(read_local_split(glue, "sst2", "train", CONFIG)) == 67349


def test_qqp_malformed_row_is_repaired(tmp_path):
    glue = require_glue_dir()
    (tmp_path / "QQP").mkdir()
    shutil.copyfile(glue / "QQP/new_dev.tsv", tmp_path / "QQP/train.tsv")
    qqp = read_local_split(tmp_path, "qqp", "train", CONFIG)
    assert len(qqp) == 23497
    assert qqp.text_b[0] == "Which level of prepration is enough for the exam jlpt5?" and qqp.labels[0] == 0
    assert int(qqp.labels.sum()) == 8747


def test_paper_split_is_randomstate0_permutation():
    glue = require_glue_dir()
    splits = load_task_splits("rte", CONFIG, glue)
    original = read_local_split(glue, "rte", "train", CONFIG)
    permutation = np.random.RandomState(0).permutation(2490)
    assert len(splits["train"]) == int(0.9 * 2490) == 2241 and len(splits["validation"]) == 249
    assert splits["train"].text_a[0] == original.text_a[permutation[0]]
    assert splits["validation"].text_a[-1] == original.text_a[permutation[-1]]
    train_idx, val_idx = split_train_validation(10, 0.1, 0)
    assert sorted([*train_idx, *val_idx]) == list(range(10)) and len(val_idx) == 1


def test_limits_keep_first_examples():
    glue = require_glue_dir()
    full = load_task_splits("mrpc", CONFIG, glue)
    small = load_task_splits("mrpc", CONFIG, glue, max_train_samples=10, max_eval_samples=5)
    assert [len(small[s]) for s in ("train", "validation", "test")] == [10, 5, 5]
    assert small["train"].text_a == full["train"].text_a[:10]


def test_missing_split_names_task_and_split():
    glue = require_glue_dir()
    with pytest.raises(GlueDataError, match=r"GLUE task 'qnli': train split .*QNLI/train.tsv"):
        load_task_splits("qnli", CONFIG, glue)
    assert len(load_task_splits("qnli", CONFIG, glue, splits=("test",))["test"]) == 5463


def test_unknown_task_and_missing_folder(tmp_path, monkeypatch):
    with pytest.raises(GlueDataError, match="unknown GLUE task 'wnli'"):
        load_task_splits("wnli", CONFIG, tmp_path)
    with pytest.raises(GlueDataError, match="GLUE data folder not found"):
        load_task_splits("rte", CONFIG, tmp_path / "absent")
    with pytest.raises(GlueDataError, match=r"GLUE task 'rte': train split .*RTE/train.tsv"):
        load_task_splits("rte", CONFIG, tmp_path)


def test_environment_variable_and_hub_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    assert resolve_glue_dir(None, CONFIG) == tmp_path
    monkeypatch.delenv("GLUE_DIR")
    assert resolve_glue_dir(None, CONFIG) is None
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(GlueDataError, match="'datasets' package is not installed"):
            load_task_splits("rte", CONFIG, None)
