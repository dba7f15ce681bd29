"""Prompts, decoding settings and the model table of the paper's LLM evaluation.

Everything comes from one data file, ``configs/llm_tasks.yaml`` (the original MergeLM strings,
verbatim). This module only reads and applies it:

* ``build_prompt(dataset, record)`` fills the dataset's template with the record's field
  (code tasks first turn the problem into the original "input" text and replace every run of four
  spaces by a tab);
* ``generation_params(dataset)`` gives the decoding of the original (greedy: temperature 0, top_p 1,
  per-dataset max tokens and stop strings);
* ``model_entry(name)`` returns the hub id / backbone / task of a paper model name.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from utils.llm.generation import GenerationParams

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "configs" / "llm_tasks.yaml"
DATASETS = ("alpaca_eval", "gsm8k", "MATH", "human_eval", "mbpp")
_DATASET_KEYS = ("template", "field", "temperature", "top_p", "max_tokens", "stop", "prompts_per_call")


@dataclass(frozen=True)
class ModelEntry:
    """One row of the paper's model table: hub id (None = local folder only), backbone name, task."""

    name: str
    hub_id: str | None
    backbone: str | None
    task: str | None


@functools.lru_cache(maxsize=8)
def _load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping at top level, got {type(config).__name__}")
    for section in ("templates", "code_inputs", "scoring", "datasets", "task_datasets", "models"):
        if section not in config:
            raise ValueError(f"{path}: missing section '{section}'")
    for name in DATASETS:
        entry = config["datasets"].get(name)
        if entry is None:
            raise ValueError(f"{path}: datasets.{name} is missing")
        missing = [key for key in _DATASET_KEYS if key not in entry]
        if missing:
            raise ValueError(f"{path}: datasets.{name} lacks {missing}")
        if entry["template"] not in config["templates"]:
            raise ValueError(f"{path}: datasets.{name}.template '{entry['template']}' is not under templates")
    return config


def load_task_config(path: str | Path | None = None) -> dict[str, Any]:
    """The parsed ``llm_tasks.yaml`` (a deep copy, so callers may change it freely)."""
    return copy.deepcopy(_load(str(path or DEFAULT_CONFIG_PATH)))


def dataset_config(dataset: str, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    config = config or load_task_config()
    if dataset not in config["datasets"]:
        raise ValueError(f"unknown dataset '{dataset}'; known: {sorted(config['datasets'])}")
    return dict(config["datasets"][dataset])


def generation_params(dataset: str, *, max_tokens: int | None = None, seed: int = 0,
                      config: Mapping[str, Any] | None = None) -> GenerationParams:
    """The original decoding of ``dataset``; ``max_tokens`` overrides the paper's value when given."""
    entry = dataset_config(dataset, config)
    return GenerationParams(
        max_new_tokens=int(max_tokens if max_tokens is not None else entry["max_tokens"]),
        temperature=float(entry["temperature"]),
        top_p=float(entry["top_p"]),
        stop=tuple(entry["stop"]),
        seed=seed,
    )


def code_input_text(dataset: str, record: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> str:
    """The original "input" of a code prompt, before the four-spaces-to-tab replacement.

    HumanEval: the problem's ``prompt``. MBPP: ``"\\n" + text + "\\nTest examples:"`` followed by
    ``"\\n" + assert`` for each of ``test_list`` (task 493: the call signature only).
    """
    config = config or load_task_config()
    inputs = config["code_inputs"]
    if dataset == "human_eval":
        return record["prompt"]
    if dataset == "mbpp":
        text = inputs["mbpp_header"].format(text=record["text"])
        overrides = {int(key): value for key, value in inputs["mbpp_test_overrides"].items()}
        if int(record["task_id"]) in overrides:
            return text + overrides[int(record["task_id"])]
        return text + "".join(inputs["mbpp_test_line"].format(test=test) for test in record["test_list"])
    raise ValueError(f"'{dataset}' is not a code dataset (human_eval, mbpp)")


def build_prompt(dataset: str, record: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> str:
    """The exact prompt string the original sends to the model for one record of ``dataset``."""
    config = config or load_task_config()
    entry = dataset_config(dataset, config)
    template = config["templates"][entry["template"]]
    if dataset in ("human_eval", "mbpp"):
        text = code_input_text(dataset, record, config).replace(config["code_inputs"]["tab_from"], "\t")
    else:
        if entry["field"] not in record:
            raise KeyError(f"{dataset} record has no field '{entry['field']}' (fields: {sorted(record)})")
        text = record[entry["field"]]
    return template.replace("{instruction}", text)


def task_datasets(task: str, config: Mapping[str, Any] | None = None) -> list[str]:
    """Benchmarks of a merge task (instruct -> AlpacaEval, math -> GSM8K + MATH, code -> HumanEval + MBPP)."""
    config = config or load_task_config()
    if task not in config["task_datasets"]:
        raise ValueError(f"unknown task '{task}'; known: {sorted(config['task_datasets'])}")
    return list(config["task_datasets"][task])


def model_entry(name: str, config: Mapping[str, Any] | None = None) -> ModelEntry | None:
    """The paper's table row for ``name`` (a short name such as ``WizardMath-13B-V1.0``), or None."""
    config = config or load_task_config()
    row = config["models"].get(name)
    if row is None:
        return None
    return ModelEntry(name=name, hub_id=row.get("hub_id"), backbone=row.get("backbone"), task=row.get("task"))
