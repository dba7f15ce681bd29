"""The six-task GLUE merging benchmark (scripts/glue_multitask_benchmark.py): its data folder.

The benchmark reads GLUE through the ordinary local-folder readers (utils/glue/data.py) from a folder it
prepares once under its root, by two fixed rules (no random draw):

* QQP: the only real QQP rows available are ``QQP/new_dev.tsv`` — a third party's random subset of GLUE QQP
  *train* (23,497 rows; see the data's SOURCE.md). Rows whose GLUE id is a multiple of 20 are QQP's dev
  split (1,213 rows), every other row its train split (22,284 rows; the usual 90 / 10 train / validation
  split of utils/glue/data.py is then taken from it). QQP numbers are therefore NOT comparable to GLUE QQP
  dev numbers: both splits come from GLUE train.
* test = every k-th row of each task's dev split in file order, k = ceil(rows / 200) (at most 200 rows:
  CoLA 174 of 1,043, SST-2 175 of 872, MRPC 136 of 408, STS-B 188 of 1,500, RTE 139 of 277, QQP 174 of
  1,213): an evenly spread sample that keeps STS-B's genres (its dev file is ordered by genre), so that
  each merged model is scored in well under a minute on 2 busy CPU cores. Scores are on these samples, not
  on full GLUE dev (an accuracy on ~150 examples has a standard error of about 4 points).
Train files are links to the shared ones (MRPC train is rebuilt from msr_paraphrase_train.txt as usual).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

from utils.glue.data import GlueDataError
from utils.records import write_json_atomic, write_text_atomic

QQP_SUBSET = "QQP/new_dev.tsv"
QQP_DEV_MODULUS = 20
QQP_RULE = (f"QQP: rows of {QQP_SUBSET} (a random subset of GLUE QQP train) whose id is a multiple of "
            f"{QQP_DEV_MODULUS} are the dev split, all others train.tsv; not comparable to GLUE QQP dev")
MAX_TEST_ROWS = 200
TEST_RULE = f"test = every k-th data row of the dev file in file order, k = ceil(rows / {MAX_TEST_ROWS})"
# Task name (configs/glue.yaml) -> (folder of the GLUE files, its dev file, header lines of that file)
TASK_FILES = {"cola": ("CoLA", "dev.tsv", 0), "sst2": ("SST-2", "dev.tsv", 1), "mrpc": ("MRPC", "dev.tsv", 1),
              "stsb": ("STS-B", "dev.tsv", 1), "rte": ("RTE", "dev.tsv", 1), "qqp": ("QQP", "dev.tsv", 0)}
TASK_FOLDERS = {task: files[0] for task, files in TASK_FILES.items()}
MANIFEST = "benchmark_data.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_qqp_rows(source: Path) -> tuple[list[list[str]], list[list[str]]]:
    """(train rows, dev rows) of the QQP subset by the id rule; rows verbatim (the malformed 5-field row
    included: the reader repairs it)."""
    with open(source, encoding="utf-8", newline="") as handle:
        rows = [row for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    train, dev = [], []
    for line, row in enumerate(rows, start=1):
        if row[0] == "id":
            continue
        try:
            identifier = int(row[0])
        except ValueError as error:
            raise GlueDataError(f"{source}, row {line}: id {row[0]!r} is not an integer") from error
        (dev if identifier % QQP_DEV_MODULUS == 0 else train).append(row)
    return train, dev


def _tsv(rows: list[list[str]]) -> str:
    return "".join("\t".join(row) + "\n" for row in rows)


def sample_test_rows(lines: list[str], header: int) -> tuple[list[str], int]:
    """(header lines + every k-th data line, k) by TEST_RULE; blank lines are not rows."""
    data = [line if line.endswith("\n") else line + "\n" for line in lines[header:] if line.strip()]
    step = max(1, math.ceil(len(data) / MAX_TEST_ROWS))
    return lines[:header] + data[::step], step


def prepare_glue_dir(shared: Path, folder: Path, tasks: list[str]) -> Path:
    """Build (or reuse) the benchmark's GLUE folder for ``tasks`` from the shared GLUE folder (rules above).

    Reuse: a task whose manifest entry names the same source file hash is kept as it is."""
    shared, folder = Path(shared).resolve(), Path(folder)
    unknown = [task for task in tasks if task not in TASK_FILES]
    if unknown:
        raise GlueDataError(f"the multitask benchmark has no data rule for task(s) {unknown}; known: {', '.join(TASK_FILES)}")
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {"tasks": {}}
    if manifest.get("shared") not in (None, str(shared)):
        raise GlueDataError(f"{folder} was prepared from {manifest['shared']}, not {shared}; choose another root")
    for task in tasks:
        name, dev_name, header = TASK_FILES[task]
        source_folder, target = shared / name, folder / name
        dev_source = source_folder / (QQP_SUBSET.split("/")[1] if task == "qqp" else dev_name)
        if not dev_source.is_file():
            raise GlueDataError(f"GLUE file not found for task '{task}': {dev_source}")
        digest = _sha256(dev_source)
        if manifest["tasks"].get(task, {}).get("sha256") == digest and (target / dev_name).is_file():
            continue
        target.mkdir(parents=True, exist_ok=True)
        if task == "qqp":
            train, dev = split_qqp_rows(dev_source)
            write_text_atomic(target / "train.tsv", _tsv(train))
            lines, rule = _tsv(dev).splitlines(keepends=True), QQP_RULE + "; " + TEST_RULE
            entry = {"train_rows": len(train), "dev_rows": len(dev)}
        else:
            for source in sorted(source_folder.iterdir()):
                link = target / source.name
                if source.name != dev_name and not link.is_symlink():
                    link.symlink_to(source)
            with open(dev_source, encoding="utf-8", newline="") as handle:
                lines, rule, entry = handle.readlines(), TEST_RULE, {}
        kept, step = sample_test_rows(lines, header)
        write_text_atomic(target / dev_name, "".join(kept))
        write_text_atomic(target / "SPLIT.md", f"{rule}.\nSource: {dev_source} (sha256 {digest}); k = {step}, "
                                               f"{len(kept) - header} test rows.\n")
        manifest["tasks"][task] = {"source": str(dev_source), "sha256": digest, "rule": rule, "step": step,
                                   "test_rows": len(kept) - header, **entry}
        manifest["shared"] = str(shared)
        write_json_atomic(manifest_path, manifest)
    return folder


# ---------------------------------------------------------------------------------------------------------
# The benchmark's stages as sweeps: the declarations in configs/sweeps/glue_multitask_*.yml, resolved for one
# root, task subset and method list, and written under the root (the resolved declaration is the record).

SWEEPS_DIR = Path(__file__).resolve().parents[2] / "configs" / "sweeps"
TRAIN_SWEEP, MERGE_SWEEP, DARE_SWEEP = "glue_multitask_train", "glue_multitask_merge", "glue_multitask_merge_dare"
ROOT_PLACEHOLDER = "save_glue_multitask"   # the sweep files' root, replaced by the benchmark's --root
MODEL_NAME = "all-MiniLM-L6-v2"             # names the checkpoints and picks the learning rate (configs/glue.yaml)
DEFAULT_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "rte")


def _rooted(value, root: Path):
    if isinstance(value, str) and (value == ROOT_PLACEHOLDER or value.startswith(ROOT_PLACEHOLDER + "/")):
        return str(root) + value[len(ROOT_PLACEHOLDER):]
    return value


def resolved_sweep(name: str, root: Path, tasks: list[str], fixed: dict | None = None, methods: list[str] | None = None,
                   train_caps: dict | None = None) -> dict:
    """The declaration ``configs/sweeps/<name>.yml`` for this benchmark run: paths under ``root``; the train
    sweep's zipped task axis cut to ``tasks`` (``train_caps`` replaces its per-task num_epochs /
    max_train_samples); the merge sweeps' tasks set to ``tasks`` and their method axis to ``methods``;
    ``fixed`` adds or replaces fixed flags."""
    import yaml

    spec = yaml.safe_load((SWEEPS_DIR / f"{name}.yml").read_text(encoding="utf-8"))
    spec["output_root"] = _rooted(spec["output_root"], root)
    spec["fixed"] = {key: _rooted(value, root) for key, value in spec["fixed"].items()}
    if name == TRAIN_SWEEP:
        axis = spec["axes"]["task"]
        keep = [axis["zip"]["dataset_name"].index(task) for task in tasks]
        axis["labels"] = [axis["labels"][i] for i in keep]
        axis["zip"] = {flag: [values[i] for i in keep] for flag, values in axis["zip"].items()}
        for flag, value in (train_caps or {}).items():
            axis["zip"][flag] = [value] * len(keep)
    else:
        spec["fixed"]["dataset_names"] = list(tasks)
        axis = "merging_method_name" if name == MERGE_SWEEP else "mask_apply_method"
        spec["axes"][axis] = list(methods or [])
    spec["fixed"].update(fixed or {})
    return spec


def declared_methods() -> list[str]:
    """The benchmark's wish list of methods (the merge sweep's method axis)."""
    import yaml

    spec = yaml.safe_load((SWEEPS_DIR / f"{MERGE_SWEEP}.yml").read_text(encoding="utf-8"))
    return list(spec["axes"]["merging_method_name"])


def usable_methods(config: dict, grid: str) -> tuple[list[str], dict[str, str]]:
    """(methods of the wish list that merge_plms_glue.py offers and the grid covers, {skipped: why})."""
    from utils.glue.cli import BASE_METHODS, registry_methods

    offered = set(BASE_METHODS) | set(registry_methods())
    used, skipped = [], {}
    for method in declared_methods():
        if method not in offered:
            skipped[method] = "not in the merging registry (or not searchable by merge_plms_glue.py)"
        elif method not in config["merge_grids"][grid]:
            skipped[method] = f"no entry in configs/glue.yaml merge_grids.{grid}"
        else:
            used.append(method)
    return used, skipped


def constant_baselines(config: dict, glue_dir: Path, tasks: list[str], max_eval_samples: int | None = None) -> dict:
    """The best constant prediction's test metrics per task (the score an expert must clearly beat): each class
    predicted for every example, the best main score kept; a constant regression output has no correlation
    (Pearson / Spearman are undefined), so STS-B's chance score is 0."""
    import numpy as np

    from utils.glue.data import load_task_splits, task_info
    from utils.glue.metrics import main_score, task_metrics

    result = {}
    for task in tasks:
        row = task_info(config, task)
        labels = load_task_splits(task, config, glue_dir, splits=("test",), max_eval_samples=max_eval_samples)["test"].labels
        if row["num_labels"] == 1:
            result[task] = {"prediction": "constant (chance: no correlation)",
                            "metrics": {**{name: 0.0 for name in row["metrics"]}, **({"averaged_scores": 0.0} if len(row["metrics"]) > 1 else {})}}
            continue
        best = None
        for label in range(row["num_labels"]):
            logits = np.zeros((len(labels), row["num_labels"]), dtype=np.float32)
            logits[:, label] = 1.0
            metrics = {key: float(value) for key, value in task_metrics(row, logits, labels).items()}
            if best is None or main_score(row, metrics) > main_score(row, best[1]):
                best = (label, metrics)
        result[task] = {"prediction": f"class {best[0]}", "metrics": best[1]}
    return result


def expert_checkpoints(experts: Path, config: dict, tasks: list[str]) -> dict[str, str]:
    """{task: checkpoint folder} of the trained experts that exist (training_state.json written)."""
    from utils.glue.checkpoints import checkpoint_dir, checkpoint_name, task_learning_rate

    found = {}
    for task in tasks:
        folder = checkpoint_dir(experts, [task], checkpoint_name(MODEL_NAME, task_learning_rate(config, MODEL_NAME, task, None)))
        if (folder / "training_state.json").is_file():
            found[task] = str(folder)
    return found
