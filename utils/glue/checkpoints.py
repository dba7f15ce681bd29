"""Checkpoint folders of the GLUE pipeline: their names and paths (and their result JSONs), reading and writing.

A checkpoint is ``<save_dir>/save_models/<tasks>/<lm>_lr<lr>[_run<r>]`` (the original MergeLM's names),
a folder written by ``save_pretrained`` (safetensors) plus the tokenizer. It is read with
``use_safetensors=True`` unless pickles are explicitly allowed.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path


def model_short_name(language_model_name: str) -> str:
    """Name used in output folders: a hub id without organisation, or a local folder's name."""
    return Path(str(language_model_name).rstrip("/\\")).name


def format_lr(learning_rate: float) -> str:
    """Python's float repr, as the original names folders (1e-5 -> '1e-05', 5e-5 -> '5e-05')."""
    return repr(float(learning_rate))


def checkpoint_name(short_name: str, learning_rate: float, run: int = 0) -> str:
    """``<lm>_lr<lr>`` for run 0, ``<lm>_lr<lr>_run<r>`` for later runs (the original's names)."""
    name = f"{short_name}_lr{format_lr(learning_rate)}"
    return name if run == 0 else f"{name}_run{run}"


def task_learning_rate(config: dict, short_name: str, task: str, override: float | None) -> float:
    """``override`` if given, else the config's table entry for (model, task), else its default."""
    if override is not None:
        return float(override)
    table = config["learning_rates"].get(short_name, {})
    return float(table.get(task, config["training"]["default_learning_rate"]))


def checkpoint_dir(save_dir: str | os.PathLike, tasks: list[str], name: str) -> Path:
    """The folder of checkpoint ``name`` trained on ``tasks`` (several: multitask, auxiliary first)."""
    return Path(save_dir) / "save_models" / "_".join(tasks) / name


def model_result_path(save_dir: str | os.PathLike, tasks: list[str], name: str) -> Path:
    """The result JSON of a trained or evaluated checkpoint: ``save_model_results/<tasks>/<name>/<name>.json``."""
    return Path(save_dir) / "save_model_results" / "_".join(tasks) / name / f"{name}.json"


def task_checkpoint(save_dir: str | os.PathLike, config: dict, language_model_name: str, task: str,
                    learning_rate: float | None) -> Path:
    """The existing run-0 checkpoint of ``task`` (learning rate: ``learning_rate``, else the config's
    table); FileNotFoundError naming the folder when it has not been trained."""
    short = model_short_name(language_model_name)
    folder = checkpoint_dir(save_dir, [task], checkpoint_name(short, task_learning_rate(config, short, task, learning_rate)))
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint of task '{task}' not found: {folder} (train it with train_plms_glue.py)")
    return folder


def save_pretrained_safetensors(obj, folder: Path) -> None:
    """``obj.save_pretrained(folder)`` with safetensors (the flag is passed where the API still has it)."""
    if "safe_serialization" in inspect.signature(obj.save_pretrained).parameters:
        obj.save_pretrained(folder, safe_serialization=True)
    else:
        obj.save_pretrained(folder)


def load_classifier(path: str | os.PathLike, *, allow_pickle: bool = False, **kwargs):
    """``AutoModelForSequenceClassification`` from a folder or hub id; safetensors only by default."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(
            str(path), use_safetensors=None if allow_pickle else True, **kwargs
        )
    except (OSError, ValueError) as error:
        hint = "" if allow_pickle else " (only safetensors weights are read; pass --allow_pickle for .bin files)"
        raise ValueError(f"cannot load model '{path}': {error}{hint}") from error


def check_head(model_config, checkpoint: Path, task: str, row: dict) -> None:
    """The checkpoint's head must have the task's number of labels."""
    if model_config.num_labels != row["num_labels"]:
        raise ValueError(
            f"checkpoint {checkpoint} has a head with {model_config.num_labels} labels but task '{task}' needs {row['num_labels']}"
        )
