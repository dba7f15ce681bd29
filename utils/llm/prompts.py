"""Prompt texts and decoding settings of the paper's LLM evaluation, read from ``configs/llm_tasks.yaml``.

That one data file holds the original MergeLM strings verbatim (templates, stop strings, max tokens,
prompts per call, the model table). This module reads it and provides the pieces that the benchmark
declarations in ``utils/llm/benchmarks.py`` combine:

* ``load_task_config()`` / ``dataset_config(dataset)``: the parsed file and one benchmark's entry;
* ``field_input`` / ``human_eval_input`` / ``mbpp_input``: the text put into a template for one record
  (code inputs then have every run of four spaces replaced by a tab, see ``code_prompt_input``);
* ``fill_template(dataset, text)``: the dataset's template with that text;
* ``generation_params(dataset)``: the decoding of the original (greedy: temperature 0, top_p 1,
  per-dataset max tokens and stop strings);
* ``task_datasets(task)``: the benchmarks of a merge task.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Mapping

import yaml

from utils.llm.generation import GenerationParams

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "configs" / "llm_tasks.yaml"
_DATASET_KEYS = ("template", "field", "temperature", "top_p", "max_tokens", "stop", "prompts_per_call")


@functools.lru_cache(maxsize=8)
def _load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping at top level, got {type(config).__name__}")
    for section in ("templates", "code_inputs", "scoring", "datasets", "task_datasets", "models"):
        if section not in config:
            raise ValueError(f"{path}: missing section '{section}'")
    for name, entry in config["datasets"].items():
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


def field_input(dataset: str, record: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The record's field named by ``datasets.<dataset>.field`` (GSM8K question, MATH / AlpacaEval instruction)."""
    field = dataset_config(dataset, config)["field"]
    if field not in record:
        raise KeyError(f"{dataset} record has no field '{field}' (fields: {sorted(record)})")
    return record[field]


def human_eval_input(record: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The original "input" of a HumanEval prompt: the problem's ``prompt``."""
    return record["prompt"]


def mbpp_input(record: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The original "input" of an MBPP prompt, before the four-spaces-to-tab replacement:
    ``"\\n" + text + "\\nTest examples:"`` then ``"\\n" + assert`` for each of ``test_list``
    (task 493: the call signature only)."""
    inputs = config["code_inputs"]
    text = inputs["mbpp_header"].format(text=record["text"])
    overrides = {int(key): value for key, value in inputs["mbpp_test_overrides"].items()}
    if int(record["task_id"]) in overrides:
        return text + overrides[int(record["task_id"])]
    return text + "".join(inputs["mbpp_test_line"].format(test=test) for test in record["test_list"])


def code_prompt_input(text: str, config: Mapping[str, Any]) -> str:
    """Code inputs as the original sent them: every run of four spaces replaced by a tab."""
    return text.replace(config["code_inputs"]["tab_from"], "\t")


def fill_template(dataset: str, text: str, config: Mapping[str, Any]) -> str:
    """The dataset's template (``datasets.<dataset>.template``) with ``{instruction}`` replaced by ``text``."""
    return config["templates"][dataset_config(dataset, config)["template"]].replace("{instruction}", text)


def task_datasets(task: str, config: Mapping[str, Any] | None = None) -> list[str]:
    """Benchmarks of a merge task (instruct -> AlpacaEval, math -> GSM8K + MATH, code -> HumanEval + MBPP)."""
    config = config or load_task_config()
    if task not in config["task_datasets"]:
        raise ValueError(f"unknown task '{task}'; known: {sorted(config['task_datasets'])}")
    return list(config["task_datasets"][task])
