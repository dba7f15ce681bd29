"""Evaluators of resident models, and the search's fitness (a weighted sum of their metrics).

* ``GlueEvaluator``: encoders on GLUE (utils/glue): one resident classifier per task whose encoder is one
  shared module, so a merge written into it serves every task; each task keeps its own head (the paper's
  protocol). ``evaluate(split)`` gives each task's metrics plus ``main`` (configs/glue.yaml's main metric) on
  ``validation`` (10% of GLUE train, where the search selects) or ``test`` (GLUE dev, where it reports).
* ``LmEvalEvaluator``: decoders with lm-eval tasks (utils/lm_eval) on the resident model: the task's metric keys
  as lm-eval writes them (``exact_match,strict-match``); ``main`` is the task's declared main metric.

A fitness term names ``TASK[:METRIC]=WEIGHT`` (METRIC default ``main``); an unknown task or metric is a
``FitnessError`` (exit 2) naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from model_merging_methods import MergeError


class FitnessError(MergeError):
    """A fitness that names an unknown task or metric (exit 2, one line)."""


@dataclass(frozen=True)
class FitnessTerm:
    task: str
    metric: str
    weight: float


def parse_fitness(texts: list[str]) -> tuple[FitnessTerm, ...]:
    terms = []
    for text in texts:
        name, sep, weight = text.rpartition("=")
        if not sep:
            name, weight = text, "1"
        task, _, metric = name.partition(":")
        try:
            value = float(weight)
        except ValueError:
            raise FitnessError(f"fitness term {text!r}: weight {weight!r} is not a number") from None
        if not task:
            raise FitnessError(f"fitness term {text!r} names no task")
        terms.append(FitnessTerm(task, metric or "main", value))
    if not terms:
        raise FitnessError("no fitness term given")
    return tuple(terms)


def fitness_value(terms: tuple[FitnessTerm, ...], metrics: dict[str, dict[str, float]]) -> float:
    """Σ weight · metrics[task][metric]; FitnessError when a term's task or metric is not among ``metrics``."""
    total = 0.0
    for term in terms:
        if term.task not in metrics:
            raise FitnessError(f"fitness names unknown task {term.task!r}; the evaluator has {', '.join(metrics)}")
        if term.metric not in metrics[term.task]:
            raise FitnessError(f"fitness names unknown metric {term.metric!r} of task {term.task!r}; it has "
                               f"{', '.join(sorted(metrics[term.task]))}")
        total += term.weight * float(metrics[term.task][term.metric])
    return total


def check_fitness(spec, terms: tuple[FitnessTerm, ...]) -> None:
    """Before any model is loaded: every term names a task the evaluator has, and for GLUE a metric of that
    task (configs/glue.yaml's metrics, ``loss``, ``main``, ``averaged_scores`` for two-metric tasks); lm-eval
    metric keys are checked against the first trial's results (fitness_value)."""
    if spec.kind == "glue":
        from utils.glue.data import load_glue_config, task_info

        config = load_glue_config(spec.glue.config_path if spec.glue else None)
        tasks = {task: task_info(config, task) for task in spec.experts}
    else:
        tasks = {task: None for task in next(iter(spec.lm_eval.values())).tasks}
    for term in terms:
        if term.task not in tasks:
            raise FitnessError(f"fitness names unknown task {term.task!r}; the evaluator has {', '.join(tasks)}")
        row = tasks[term.task]
        if row is not None:
            known = [*row["metrics"], "loss", "main"] + (["averaged_scores"] if len(row["metrics"]) > 1 else [])
            if term.metric not in known:
                raise FitnessError(f"fitness names unknown metric {term.metric!r} of task {term.task!r}; it has "
                                   f"{', '.join(known)}")


@dataclass(frozen=True)
class GlueEvalOptions:
    glue_dir: Optional[str] = None
    max_eval_samples: Optional[int] = None       # first examples of the selection split (validation)
    max_report_samples: Optional[int] = None     # first examples of the report split (test = GLUE dev)
    batch_size: int = 64
    max_seq_length: int = 128
    device: str = "cpu"
    config_path: Optional[str] = None


class GlueEvaluator:
    """Resident GLUE task classifiers sharing one encoder (see the module docstring)."""

    kind = "glue"

    def __init__(self, experts: dict[str, Path], options: GlueEvalOptions, splits: tuple[str, ...] = ("validation", "test")):
        from transformers import AutoTokenizer

        from utils.glue.checkpoints import load_classifier
        from utils.glue.data import load_glue_config, load_task_splits, task_info
        from utils.glue.training import encode_split, make_loader

        self.config = load_glue_config(options.config_path)
        self.options, self.device = options, torch.device(options.device)
        self.rows = {task: task_info(self.config, task) for task in experts}
        self.exclude = tuple(self.config["exclude_param_names_regex"])
        self.models, self.loaders = {}, {}
        shared = None
        for task, folder in experts.items():
            model = load_classifier(folder)
            if model.config.num_labels != self.rows[task]["num_labels"]:
                raise FitnessError(f"expert {folder} has a head with {model.config.num_labels} labels but task "
                                   f"{task!r} needs {self.rows[task]['num_labels']}")
            prefix = model.base_model_prefix
            if shared is None:
                shared, self.prefix = getattr(model, prefix), prefix
            else:
                setattr(model, prefix, shared)      # one encoder: a merge written into it serves every task
            self.models[task] = model.to(self.device).eval()
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            data = {}
            for split in splits:
                cap = options.max_report_samples if split == "test" else options.max_eval_samples
                data.update(load_task_splits(task, self.config, options.glue_dir, splits=(split,), max_eval_samples=cap))
            self.loaders[task] = {split: make_loader(encode_split(tokenizer, data[split], self.rows[task],
                                                                  options.max_seq_length),
                                                     tokenizer, options.batch_size, shuffle=False) for split in splits}
        self.target = next(iter(self.models.values()))   # the module a merge writes into (heads: excluded)
        self.sizes = {task: {split: len(loader.dataset) for split, loader in loaders.items()}
                      for task, loaders in self.loaders.items()}

    def tasks(self) -> list[str]:
        return list(self.models)

    def evaluate(self, split: str) -> dict[str, dict[str, float]]:
        from utils.glue.metrics import main_score
        from utils.glue.training import evaluate_task

        results = {}
        for task, model in self.models.items():
            metrics = evaluate_task(model, self.loaders[task][split], self.rows[task], self.device)
            results[task] = {**metrics, "main": main_score(self.rows[task], metrics)}
        return results


class LmEvalEvaluator:
    """A resident causal LM and its tokenizer, evaluated with lm-eval tasks (validation and report options)."""

    kind = "lm_eval"

    def __init__(self, model_folder: Path, options_by_split: dict, dtype: str = "auto"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from utils.lm_eval import check_tasks

        for options in options_by_split.values():
            check_tasks(options)
        self.options_by_split = options_by_split
        self.target = AutoModelForCausalLM.from_pretrained(model_folder, dtype=dtype, use_safetensors=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_folder)
        self.exclude, self.prefix = (), None
        self.sizes = {}

    def tasks(self) -> list[str]:
        return list(next(iter(self.options_by_split.values())).tasks)

    def evaluate(self, split: str) -> dict[str, dict[str, float]]:
        from utils.lm_eval import evaluate_module, main_metric

        options = self.options_by_split[split]
        results = evaluate_module(self.target, self.tokenizer, options)
        out = {}
        for task in options.tasks:
            metrics = {k: float(v) for k, v in results["results"][task].items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr," not in k}
            main = main_metric(task, results)
            if main in metrics:
                metrics["main"] = metrics[main]
            out[task] = metrics
        return out
