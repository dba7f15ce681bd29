"""Run-level helpers of the GLUE scripts: seeding, device, names, versions, atomic outputs, checkpoints.

Checkpoints are folders written by ``save_pretrained`` (safetensors) plus the tokenizer; they are read
with ``use_safetensors=True`` unless pickles are explicitly allowed (then ``weights_only=True``).
Every output is first written under a temporary name next to its target and then renamed, so a failed
run leaves no partial file or folder behind.
"""
from __future__ import annotations

import argparse
import inspect
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch



class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's line breaks and shows every flag's default."""


def add_run_arguments(parser: argparse.ArgumentParser, save_dir_help: str) -> None:
    """Flags every GLUE script shares: data, outputs, config, device, pickles, progress bars."""
    parser.add_argument("--glue_dir", default=None, help="local GLUE folder (default: $GLUE_DIR, else the hub dataset nyu-mll/glue)")
    parser.add_argument("--save_dir", default=".", help=save_dir_help)
    parser.add_argument("--config", default=None, help="GLUE config YAML (default: configs/glue.yaml)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--gpu", type=int, default=None, help="the original's CUDA index flag (negative = cpu); overrides auto")
    parser.add_argument("--allow_pickle", action="store_true", help="allow checkpoints stored as pickles (.bin), loaded with weights_only=True")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")


def add_dare_arguments(parser: argparse.ArgumentParser) -> None:
    """The paper's DARE flags; --weight_mask_rate defaults to 0.0 (the original's 0.1 silently alters models)."""
    parser.add_argument("--weight_format", choices=["delta_weight", "finetuned_weight"], default="delta_weight", help="what DARE masks: θ_ft − θ_pre or θ_ft")
    parser.add_argument("--weight_mask_rate", type=float, default=0.0, help="DARE drop rate p in [0, 1) (0 = the models as they are)")
    parser.add_argument("--use_weight_rescale", action="store_true", help="divide kept entries by 1 − p (DARE); off = DropOnly")
    parser.add_argument("--mask_strategy", choices=["random", "magnitude"], default="random", help="random (Bernoulli) or magnitude (smallest |x|) dropping")


def set_random_seed(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def resolve_device(device: str | None, gpu: int | None = None) -> torch.device:
    """``--device`` (cpu, cuda, cuda:N, auto) or the paper's ``--gpu N``; auto = cuda:0 if available."""
    if device in (None, "auto"):
        if gpu is not None:
            return torch.device(f"cuda:{gpu}" if gpu >= 0 and torch.cuda.is_available() else "cpu")
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but CUDA is not available")
    return resolved


def model_short_name(language_model_name: str) -> str:
    """Name used in output folders: a hub id without organisation, or a local folder's name."""
    return Path(str(language_model_name).rstrip("/\\")).name


def format_lr(learning_rate: float) -> str:
    """Python's float repr, as the original names folders (1e-5 -> '1e-05', 5e-5 -> '5e-05')."""
    return repr(float(learning_rate))


def checkpoint_name(short_name: str, learning_rate: float, run: int = 0) -> str:
    """``<lm>_lr<lr>`` for run 0, ``<lm>_lr<lr>_run<r>`` for later runs (spec §3.5)."""
    name = f"{short_name}_lr{format_lr(learning_rate)}"
    return name if run == 0 else f"{name}_run{run}"


def task_learning_rate(config: dict, short_name: str, task: str, override: float | None) -> float:
    """``override`` if given, else the config's table entry for (model, task), else its default."""
    if override is not None:
        return float(override)
    table = config["learning_rates"].get(short_name, {})
    return float(table.get(task, config["training"]["default_learning_rate"]))


def save_folder_atomic(target: str | os.PathLike, write) -> Path:
    """Call ``write(temporary_folder)`` and then move the folder to ``target`` (replacing it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write(temporary)
        if target.exists():
            shutil.rmtree(target)
        os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target


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


def config_path_from_argv(argv) -> str | None:
    """The value of ``--config`` in ``argv`` (needed before parsing: parser defaults come from it)."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    for index, token in enumerate(tokens):
        if token == "--config" and index + 1 < len(tokens):
            return tokens[index + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None
