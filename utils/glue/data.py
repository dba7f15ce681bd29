"""GLUE data for the encoder experiments: task table, readers for local GLUE files, splits.

Splits follow the original MergeLM: the original GLUE train split is permuted with
``numpy.random.RandomState(split_seed)`` (seed 0); the first ``int(0.9 * N)`` examples are the train
split, the remaining 10% the validation split; the original GLUE dev split (MNLI: dev matched) is the
test split.

Data comes from a local folder of the original GLUE files (``--glue_dir`` or the environment variable
``GLUE_DIR``) or, when neither is set, from the Hugging Face hub dataset ``nyu-mll/glue`` (only if
the ``datasets`` package is importable). Local-file quirks handled here (see the data's SOURCE.md):
MRPC files start with a UTF-8 BOM; CoLA and QQP ``new_dev.tsv`` have no header; sentences contain bare
quote characters (files are read with ``csv.QUOTE_NONE``); MNLI dev comes as ``dev.jsonl``; QQP's
known malformed row (question2 and label joined by a space) is repaired by taking the label from the
end of the last field. MRPC train is rebuilt as GLUE does (``msr_paraphrase_train.txt`` minus the
pairs of ``dev_ids.tsv``, 3668 pairs), because the local ``train.tsv`` lacks one pair.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_PATH = REPO_ROOT / "configs" / "glue.yaml"
SPLITS = ("train", "validation", "test")


class GlueDataError(ValueError):
    """A GLUE task, split or file that cannot be used; the message names the task, split and file."""


def load_glue_config(path: str | os.PathLike | None = None) -> dict:
    """Read the GLUE YAML config (task table, training defaults, learning rates, merge grids)."""
    config_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    if not config_path.is_file():
        raise GlueDataError(f"GLUE config file not found: {config_path}")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise GlueDataError(f"GLUE config {config_path} is not valid YAML{where}") from None
    if not isinstance(config, dict):
        raise GlueDataError(f"GLUE config {config_path} is a {type(config).__name__}, not a mapping of sections")
    for key in ("tasks", "splits", "training", "learning_rates", "merge_grids", "exclude_param_names_regex"):
        if key not in config:
            raise GlueDataError(f"GLUE config {config_path} lacks the section '{key}'")
    return config


def task_info(config: dict, task: str) -> dict:
    """The config's task-table row of ``task``; unknown task -> GlueDataError listing the known ones."""
    if task not in config["tasks"]:
        raise GlueDataError(f"unknown GLUE task '{task}'; known tasks: {', '.join(config['tasks'])}")
    return config["tasks"][task]


@dataclass
class GlueSplit:
    """One split of one task: text_a[i] (and text_b[i] for pair tasks) with labels[i].

    labels are int64 class ids, or float32 scores for the regression task STS-B.
    """

    task: str
    split: str
    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.text_a)

    def select(self, indices) -> "GlueSplit":
        """The examples at ``indices`` (in that order)."""
        idx = [int(i) for i in indices]
        return GlueSplit(
            task=self.task,
            split=self.split,
            text_a=[self.text_a[i] for i in idx],
            text_b=None if self.text_b is None else [self.text_b[i] for i in idx],
            labels=self.labels[idx],
        )

    def head(self, n: int | None) -> "GlueSplit":
        """The first ``n`` examples (all when n is None or larger than the split)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise GlueDataError(f"{self.task} {self.split}: the example limit must be positive, got {n}")
        return self.select(range(n))


NLI_LABELS = {"entailment": 0, "not_entailment": 1}
MNLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}


def _read_tsv(path: Path, *, encoding: str = "utf-8") -> list[list[str]]:
    with open(path, encoding=encoding, newline="") as handle:
        return [row for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if row]


def _columns(rows: list[list[str]], path: Path, names: list[str]) -> tuple[list[list[str]], list[int]]:
    """Split off the header row and return the data rows plus the positions of ``names``."""
    header = rows[0]
    missing = [name for name in names if name not in header]
    if missing:
        raise GlueDataError(f"{path}: header {header} lacks the column(s) {missing}")
    return rows[1:], [header.index(name) for name in names]


def _label(value: str, mapping: dict | None, path: Path, line: int):
    try:
        return mapping[value] if mapping is not None else int(value)
    except (KeyError, ValueError) as error:
        raise GlueDataError(f"{path}, data row {line}: unexpected label {value!r}") from error


def _pairs_from_header_tsv(path, names, label_name, mapping=None, encoding="utf-8", label_type=int):
    rows, (ia, ib, il) = _columns(_read_tsv(path, encoding=encoding), path, [*names, label_name])
    text_a, text_b, labels = [], [], []
    for line, row in enumerate(rows, start=1):
        if len(row) <= max(ia, ib, il):
            raise GlueDataError(f"{path}, data row {line}: {len(row)} fields, expected more than {max(ia, ib, il)}")
        text_a.append(row[ia])
        text_b.append(row[ib])
        labels.append(float(row[il]) if label_type is float else _label(row[il], mapping, path, line))
    return text_a, text_b, labels


def _read_cola(path: Path):
    sentences, labels = [], []
    for line, row in enumerate(_read_tsv(path), start=1):
        if len(row) != 4:
            raise GlueDataError(f"{path}, row {line}: {len(row)} fields, expected 4 (CoLA has no header)")
        labels.append(_label(row[1], None, path, line))
        sentences.append(row[3])
    return sentences, None, labels


def _read_sst2(path: Path):
    rows, (i_sentence, i_label) = _columns(_read_tsv(path), path, ["sentence", "label"])
    return [r[i_sentence] for r in rows], None, [_label(r[i_label], None, path, n) for n, r in enumerate(rows, 1)]


def _read_mrpc_tsv(path: Path):
    rows, (i_label, ia, ib) = _columns(
        _read_tsv(path, encoding="utf-8-sig"), path, ["Quality", "#1 String", "#2 String"]
    )
    return [r[ia] for r in rows], [r[ib] for r in rows], [_label(r[i_label], None, path, n) for n, r in enumerate(rows, 1)]


def _read_mrpc_train(folder: Path):
    """GLUE's construction of MRPC train: msr_paraphrase_train.txt minus the pairs in dev_ids.tsv."""
    raw, dev_ids = folder / "msr_paraphrase_train.txt", folder / "dev_ids.tsv"
    if raw.is_file() and dev_ids.is_file():
        excluded = {tuple(row[:2]) for row in _read_tsv(dev_ids, encoding="utf-8-sig")}
        rows, (i_label, i1, i2, ia, ib) = _columns(
            _read_tsv(raw, encoding="utf-8-sig"), raw, ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
        )
        kept = [r for r in rows if (r[i1], r[i2]) not in excluded]
        return [r[ia] for r in kept], [r[ib] for r in kept], [_label(r[i_label], None, raw, n) for n, r in enumerate(kept, 1)]
    return _read_mrpc_tsv(_require(folder / "train.tsv", "mrpc", "train"))


def _read_stsb(path: Path):
    return _pairs_from_header_tsv(path, ["sentence1", "sentence2"], "score", label_type=float)


def _read_qqp(path: Path):
    """QQP rows ``id qid1 qid2 question1 question2 is_duplicate``, with or without the GLUE header.

    A row with 5 fields is the known malformed row whose question2 and label are joined by a space; the
    label is taken from the end of its last field.
    """
    text_a, text_b, labels = [], [], []
    rows = _read_tsv(path)
    if rows and rows[0][:1] == ["id"]:
        rows = rows[1:]
    for line, row in enumerate(rows, start=1):
        if len(row) == 6:
            question2, label = row[4], row[5]
        elif len(row) == 5 and row[4].rsplit(" ", 1)[-1] in ("0", "1"):
            question2, label = row[4].rsplit(" ", 1)
        else:
            raise GlueDataError(f"{path}, data row {line}: {len(row)} fields, expected 6 (QQP)")
        text_a.append(row[3])
        text_b.append(question2)
        labels.append(_label(label, None, path, line))
    return text_a, text_b, labels


def _read_mnli_jsonl(path: Path):
    text_a, text_b, labels = [], [], []
    with open(path, encoding="utf-8") as handle:
        for line, raw in enumerate(handle, start=1):
            if raw.strip():
                record = json.loads(raw)
                text_a.append(record["premise"])
                text_b.append(record["hypothesis"])
                labels.append(_label(record["label"], MNLI_LABELS, path, line))
    return text_a, text_b, labels


def _read_mnli_tsv(path: Path):
    return _pairs_from_header_tsv(path, ["sentence1", "sentence2"], "gold_label", MNLI_LABELS)


def _read_nli(question_key: str, sentence_key: str):
    def reader(path: Path):
        return _pairs_from_header_tsv(path, [question_key, sentence_key], "label", NLI_LABELS)

    return reader


# (task, split) -> list of (file name relative to the task folder, reader); the first existing file wins.
LOCAL_LAYOUT = {
    ("cola", "train"): [("CoLA/train.tsv", _read_cola)],
    ("cola", "test"): [("CoLA/dev.tsv", _read_cola)],
    ("sst2", "train"): [("SST-2/train.tsv", _read_sst2)],
    ("sst2", "test"): [("SST-2/dev.tsv", _read_sst2)],
    ("mrpc", "train"): [("MRPC", _read_mrpc_train)],
    ("mrpc", "test"): [("MRPC/dev.tsv", _read_mrpc_tsv)],
    ("stsb", "train"): [("STS-B/train.tsv", _read_stsb)],
    ("stsb", "test"): [("STS-B/dev.tsv", _read_stsb)],
    ("qqp", "train"): [("QQP/train.tsv", _read_qqp)],
    ("qqp", "test"): [("QQP/dev.tsv", _read_qqp)],
    ("mnli", "train"): [("MNLI/train.tsv", _read_mnli_tsv), ("MNLI/train.jsonl", _read_mnli_jsonl)],
    ("mnli", "test"): [("MNLI/dev_matched.tsv", _read_mnli_tsv), ("MNLI/dev.jsonl", _read_mnli_jsonl)],
    ("qnli", "train"): [("QNLI/train.tsv", _read_nli("question", "sentence"))],
    ("qnli", "test"): [("QNLI/dev.tsv", _read_nli("question", "sentence"))],
    ("rte", "train"): [("RTE/train.tsv", _read_nli("sentence1", "sentence2"))],
    ("rte", "test"): [("RTE/dev.tsv", _read_nli("sentence1", "sentence2"))],
}
ORIGINAL_SPLIT = {"train": "train", "test": "dev"}


def _require(path: Path, task: str, split: str) -> Path:
    if not path.exists():
        raise GlueDataError(f"GLUE task '{task}': {split} split missing, file not found: {path}")
    return path


def resolve_glue_dir(glue_dir: str | os.PathLike | None, config: dict) -> Path | None:
    """``glue_dir`` if given, else the config's environment variable (GLUE_DIR), else None (= hub)."""
    chosen = glue_dir if glue_dir is not None else os.environ.get(config.get("glue_dir_env", "GLUE_DIR"))
    if chosen is None or str(chosen) == "":
        return None
    path = Path(chosen)
    if not path.is_dir():
        raise GlueDataError(f"GLUE data folder not found: {path}")
    return path


def read_local_split(glue_dir: Path, task: str, original_split: str, config: dict) -> GlueSplit:
    """Read GLUE's original ``train`` or ``test`` (= GLUE dev) split of ``task`` from ``glue_dir``."""
    info = task_info(config, task)
    candidates = LOCAL_LAYOUT[(task, original_split)]
    for relative, reader in candidates:
        path = glue_dir / relative
        if path.exists():
            text_a, text_b, labels = reader(path)
            if not text_a:
                raise GlueDataError(f"GLUE task '{task}': {original_split} file {path} has no examples")
            dtype = np.float32 if info["num_labels"] == 1 else np.int64
            return GlueSplit(task, original_split, text_a, text_b, np.asarray(labels, dtype=dtype))
    tried = ", ".join(str(glue_dir / relative) for relative, _ in candidates)
    raise GlueDataError(
        f"GLUE task '{task}': {ORIGINAL_SPLIT[original_split]} split (used as {original_split}) missing "
        f"in {glue_dir}; looked for {tried}"
    )


def read_hub_split(task: str, original_split: str, config: dict) -> GlueSplit:
    """Read a split from the hub dataset ``nyu-mll/glue`` (needs the ``datasets`` package)."""
    try:
        import datasets
    except ImportError as error:
        raise GlueDataError(
            f"GLUE task '{task}': no --glue_dir or {config.get('glue_dir_env', 'GLUE_DIR')} given and the "
            "'datasets' package is not installed, so the hub copy cannot be read"
        ) from error
    info = task_info(config, task)
    hub_split = "train" if original_split == "train" else info["hub_test_split"]
    try:
        data = datasets.load_dataset(config["hub_dataset"], task, split=hub_split)
    except Exception as error:
        raise GlueDataError(f"GLUE task '{task}': cannot load hub split {config['hub_dataset']}/{task}/{hub_split}: {error}") from error
    keys = info["text_keys"]
    dtype = np.float32 if info["num_labels"] == 1 else np.int64
    return GlueSplit(
        task,
        original_split,
        list(data[keys[0]]),
        list(data[keys[1]]) if len(keys) > 1 else None,
        np.asarray(data["label"], dtype=dtype),
    )


def split_train_validation(n: int, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Permutation with RandomState(seed); first int((1 - val_ratio) * n) -> train, rest -> validation."""
    permutation = np.random.RandomState(seed).permutation(n)
    n_train = int((1 - val_ratio) * n)
    return permutation[:n_train], permutation[n_train:]


def load_task_splits(
    task: str,
    config: dict,
    glue_dir: str | os.PathLike | None = None,
    splits: tuple[str, ...] = SPLITS,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    max_validation_samples: int | None = None,
) -> dict[str, GlueSplit]:
    """The requested splits of ``task``: train (90%), validation (10% of GLUE train), test (GLUE dev).

    ``max_train_samples`` keeps the first examples of the (already permuted) train split;
    ``max_eval_samples`` the first examples of validation and test; ``max_validation_samples``, when
    given, caps validation instead (a random sample, the split being permuted), so that a search can
    select on a small validation sample while test stays whole.
    """
    task_info(config, task)
    for split in splits:
        if split not in SPLITS:
            raise GlueDataError(f"unknown split '{split}' for task '{task}'; use one of {SPLITS}")
    folder = resolve_glue_dir(glue_dir, config)

    def read(original_split: str) -> GlueSplit:
        if folder is None:
            return read_hub_split(task, original_split, config)
        return read_local_split(folder, task, original_split, config)

    result: dict[str, GlueSplit] = {}
    if "train" in splits or "validation" in splits:
        original_train = read("train")
        train_idx, val_idx = split_train_validation(
            len(original_train), config["splits"]["val_ratio"], config["splits"]["split_seed"]
        )
        if "train" in splits:
            result["train"] = _renamed(original_train.select(train_idx), "train").head(max_train_samples)
        if "validation" in splits:
            validation_cap = max_eval_samples if max_validation_samples is None else max_validation_samples
            result["validation"] = _renamed(original_train.select(val_idx), "validation").head(validation_cap)
    if "test" in splits:
        result["test"] = _renamed(read("test"), "test").head(max_eval_samples)
    for split, data in result.items():
        if len(data) == 0:
            raise GlueDataError(f"GLUE task '{task}': {split} split is empty")
    return result


def _renamed(data: GlueSplit, split: str) -> GlueSplit:
    data.split = split
    return data

