"""Command-line pieces of the three GLUE scripts, declared once (the shared ones are in utils/cli.py)."""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

from utils.cli import config_path_from_argv
from utils.glue.data import GlueDataError, load_glue_config

# Declared here, not in search.py, so that the scripts' parsers need no torch (fast --help).
BASE_METHODS = ("average_merging", "task_arithmetic", "fisher_merging", "regmean_merging", "regmean_plusplus", "ties_merging",
                "norm_adaptive")
MERGING_METHODS = (*BASE_METHODS, "mask_merging")
MASK_SEARCHES = ("per_task", "wide")   # mask_merging: each task on its own best base setting (the original), or wider
WINNERS = ("all", "mean")   # which winners a merge search selects (and scores on test)
NOT_SEARCHED = ("slerp", "dare", "dare_linear", "dare_ties", "passthrough")   # one model / DARE built in: use mask_merging


def registry_methods() -> tuple[str, ...]:
    """Methods of the merging registry that merge_plms_glue.py can also search (besides the MergeLM ones):
    every registered method that merges several models and needs no statistics (the search collects Fisher and
    RegMean statistics for those methods only), in registry order. Their grids (configs/glue.yaml) name MergeOptions
    fields, or the method's parameters for the registry's parameter methods. The registry loads without torch."""
    from model_merging_methods.registry import REGISTRY

    return tuple(name for name, method in REGISTRY.items()
                 if name not in BASE_METHODS and name not in NOT_SEARCHED and method.statistics is None
                 and (method.max_models is None or method.max_models >= 2))


def add_run_arguments(parser: argparse.ArgumentParser, save_dir_help: str) -> None:
    """Flags every GLUE script shares: data, outputs, config, device, pickles, progress bars."""
    parser.add_argument("--glue_dir", default=None, help="local GLUE folder (default: $GLUE_DIR, else the hub dataset nyu-mll/glue)")
    parser.add_argument("--save_dir", default=".", help=save_dir_help)
    parser.add_argument("--config", default=None, help="GLUE config YAML (default: configs/glue.yaml)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--gpu", type=int, default=None, help="the original's CUDA index flag (negative = cpu); overrides auto")
    parser.add_argument("--allow_pickle", action="store_true", help="allow checkpoints stored as pickles (.bin), loaded with weights_only=True")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")


def config_from_argv(argv) -> dict:
    """The GLUE config named by ``--config`` in ``argv`` (default configs/glue.yaml); a bad one exits."""
    try:
        return load_glue_config(config_path_from_argv(argv))
    except GlueDataError as error:
        raise SystemExit(f"error: {error}") from error


def check_tasks(parser: argparse.ArgumentParser, config: dict, tasks) -> None:
    """Every task must be in the config's task table, else exit 2 naming it."""
    for task in tasks:
        if task not in config["tasks"]:
            parser.error(f"unknown GLUE task '{task}'; known tasks: {', '.join(config['tasks'])}")


def precheck(prog: str, args: argparse.Namespace, config: dict) -> None:
    """Refusals before torch loads (utils/precheck.py): a local --language_model_name that does not exist,
    a --glue_dir (or $GLUE_DIR) that is not a folder."""
    from utils.glue.data import resolve_glue_dir
    from utils.precheck import model_source, refusals

    with refusals(prog, (GlueDataError,)):
        model_source(args.language_model_name, "--language_model_name")
        resolve_glue_dir(args.glue_dir, config)


@contextmanager
def user_errors():
    """Quiet transformers' logging; a user error of the run (bad data, value, file) exits with status 2 and
    its one-line message on stderr (MergeError is a ValueError)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    except (GlueDataError, ValueError, OSError) as error:
        from utils.cli import error_line

        print(f"error: {error_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error
