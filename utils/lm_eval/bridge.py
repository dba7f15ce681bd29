"""Evaluate models with lm-evaluation-harness (PyPI ``lm-eval``), offline, on disk or in memory.

* Tasks come from lm-eval's include-path mechanism: ``configs/lm_eval/`` (the project's offline declarations:
  ``gsm8k_local``, ``mbpp_local``, ``humaneval_local``, ``gsm8k_answer_nll``, ``mbpp_answer_nll``) plus any
  ``include_paths`` the user adds. lm-eval's own catalogue (whose data come from the hub) is indexed only with
  ``builtin_tasks=True``; a task name found in none of these is refused before any model is loaded.
* On disk: ``evaluate_folder`` runs ``simple_evaluate`` with lm-eval's ``hf`` model (transformers) or ``vllm``.
* In memory: ``evaluate_module`` wraps a resident ``nn.Module`` and its tokenizer in lm-eval's ``HFLM``, so a
  merge written into a resident model's parameters is evaluated without writing it (search_merge.py).
* The settings users pass to ``lm_eval`` are passed through unchanged: tasks, ``num_fewshot``, ``limit``,
  ``apply_chat_template``, ``fewshot_as_multiturn``, ``gen_kwargs``, batch size, seed (lm-eval's four seeds all
  take it), ``log_samples``.
* ``result_record`` turns lm-eval's results into the project's result file (``summary.json`` under
  ``save_lm_eval_results/``): metric keys as lm-eval writes them (``exact_match,strict-match``, ``acc,none``),
  the task's main metric (its YAML's ``metadata.main_metric``), resolved settings, versions; the aggregation
  (utils/aggregation/collect.py) reads it into the same tables as the project's own scorers.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

TASKS_DIR = Path(__file__).resolve().parents[2] / "configs" / "lm_eval"
BACKENDS = ("hf", "vllm")
RESULT_ROOT = "save_lm_eval_results"
# Fallback main metrics for tasks whose YAML declares none (lm-eval's built-in tasks), first present wins.
MAIN_FALLBACK = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,none", "pass@1,create_test",
                 "pass_at_1,none", "word_perplexity,none")


class LmEvalError(ValueError):
    """A user error in lm-eval settings (unknown task, bad value): reported in one line, exit 2."""


@dataclass(frozen=True)
class LmEvalOptions:
    tasks: tuple[str, ...]
    num_fewshot: Optional[int] = None          # None: each task's own default
    limit: Optional[float] = None              # examples per task (< 1: a fraction), as lm_eval --limit
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool = False
    gen_kwargs: Optional[dict] = None
    batch_size: int | str = 1
    seed: int = 0
    log_samples: bool = False
    include_paths: tuple[str, ...] = ()
    builtin_tasks: bool = False
    data_dir: Optional[str] = None             # GSM8K / MBPP files of the offline tasks (utils/llm/data.py)
    backend: str = "hf"
    device: str = "cpu"
    dtype: str = "auto"
    model_args: dict = field(default_factory=dict)   # extra model arguments (e.g. vLLM's gpu_memory_utilization)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise LmEvalError("no lm-eval task given")
        if self.backend not in BACKENDS:
            raise LmEvalError(f"unknown lm-eval backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise LmEvalError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit <= 0:
            raise LmEvalError(f"limit must be > 0, got {self.limit}")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise LmEvalError("fewshot_as_multiturn needs apply_chat_template (as lm_eval requires)")

    def search_paths(self) -> tuple[str, ...]:
        return (str(TASKS_DIR), *[str(Path(p)) for p in self.include_paths])

    def metadata(self) -> dict:
        return {"data_dir": str(Path(self.data_dir).resolve())} if self.data_dir else {}


@functools.lru_cache(maxsize=8)
def _task_manager(paths: tuple[str, ...], builtin: bool, metadata: tuple):
    from lm_eval.tasks import TaskManager

    for path in paths:
        if not Path(path).is_dir():
            raise LmEvalError(f"lm-eval include path {path} is not a folder")
    return TaskManager(include_path=list(paths), include_defaults=builtin, metadata=dict(metadata) or None)


def task_manager(options: LmEvalOptions):
    return _task_manager(options.search_paths(), options.builtin_tasks, tuple(sorted(options.metadata().items())))


def offline_tasks(options: LmEvalOptions) -> list[str]:
    """Task, group and tag names declared in the include paths (and lm-eval's catalogue with builtin_tasks)."""
    return list(task_manager(options).all_tasks)


def check_tasks(options: LmEvalOptions) -> None:
    """Every task name must be declared where this run looks; else LmEvalError naming it and the valid ones."""
    known = set(offline_tasks(options))
    for task in options.tasks:
        if task not in known:
            where = ", ".join(options.search_paths()) + (" and lm-eval's catalogue" if options.builtin_tasks else "")
            own = sorted(t for t in known if not t.startswith("_"))[:30] if not options.builtin_tasks else []
            hint = f"; offline tasks: {', '.join(own)}" if own else ""
            raise LmEvalError(f"unknown lm-eval task {task!r} (not declared in {where}){hint}")


def _evaluate(model: Any, options: LmEvalOptions, model_args: Optional[dict] = None) -> dict:
    import lm_eval

    check_tasks(options)
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=list(options.tasks), num_fewshot=options.num_fewshot,
        limit=options.limit, batch_size=options.batch_size, device=options.device,
        apply_chat_template=options.apply_chat_template, fewshot_as_multiturn=options.fewshot_as_multiturn,
        gen_kwargs=dict(options.gen_kwargs) if options.gen_kwargs else None, log_samples=options.log_samples,
        random_seed=options.seed, numpy_random_seed=options.seed, torch_random_seed=options.seed,
        fewshot_random_seed=options.seed, task_manager=task_manager(options), bootstrap_iters=0,
        confirm_run_unsafe_code=False)
    if results is None:
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    return results


def evaluate_folder(path: str | os.PathLike, options: LmEvalOptions) -> dict:
    """lm-eval on a model folder (or hub id) with the ``hf`` (transformers) or ``vllm`` backend."""
    args = {"pretrained": str(path), "dtype": options.dtype, **options.model_args}
    return _evaluate(options.backend, options, args)


def evaluate_module(model, tokenizer, options: LmEvalOptions) -> dict:
    """lm-eval on a resident transformers model (no disk write): lm-eval's HFLM around ``model``."""
    from lm_eval.models.huggingface import HFLM

    check_tasks(options)
    model.eval()
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size, device=options.device,
                   **options.model_args)
    return _evaluate(wrapped, options)


def main_metric(task: str, results: dict) -> Optional[str]:
    """The task's main metric key: its YAML's ``metadata.main_metric``, else the first of MAIN_FALLBACK present."""
    declared = (results.get("configs", {}).get(task, {}).get("metadata") or {}).get("main_metric")
    metrics = results.get("results", {}).get(task, {})
    if declared:
        return declared
    return next((key for key in MAIN_FALLBACK if key in metrics), None)


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr," not in k and k != "sample_len"}


def result_record(results: dict, options: LmEvalOptions, model: str, *, how: str, merge: Optional[dict] = None,
                  seconds: Optional[float] = None) -> dict:
    """The project's result file for one lm-eval run: per task the metrics lm-eval reports (its keys), the main
    metric, the number of samples, and the resolved settings; ``merge`` describes a merged model (method, recipe)."""
    from utils.records import library_versions

    tasks = {}
    for task in options.tasks:
        metrics = results["results"].get(task)
        if metrics is None:
            continue
        tasks[task] = {"metrics": _numbers(metrics), "main_metric": main_metric(task, results),
                       "num_samples": (results.get("n-samples", {}).get(task) or {}).get("effective"),
                       "version": results.get("versions", {}).get(task),
                       "num_fewshot": results.get("n-shot", {}).get(task)}
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()}
    return {"script": "evaluate_lm_eval.py", "harness": "lm-eval", "model": str(model), "how": how,
            "merge": merge, "seed": options.seed, "config": {"lm_eval": settings}, "tasks": tasks,
            "seconds": seconds, "versions": {**library_versions(), "lm_eval": _version("lm_eval"), "datasets": _version("datasets")}}


def _version(package: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def result_path(save_dir: str | os.PathLike, save_name: str) -> Path:
    return Path(save_dir) / RESULT_ROOT / save_name / "summary.json"


def write_result(save_dir: str | os.PathLike, save_name: str, record: dict, samples: Optional[dict] = None) -> Path:
    """Write ``summary.json`` (and, with log_samples, ``samples_<task>.jsonl``) atomically; returns its path."""
    from utils.records import write_json_atomic, write_text_atomic

    path = result_path(save_dir, save_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    for task, rows in (samples or {}).items():
        write_text_atomic(path.parent / f"samples_{task}.jsonl",
                          "".join(json.dumps(row, default=str) + "\n" for row in rows))
    write_json_atomic(path, record)
    return path


def merge_description(folder: Path) -> Optional[dict]:
    """Method and inputs of a merged folder, from its merge_manifest.json (None when the folder is no merge)."""
    try:
        manifest = json.loads((folder / "merge_manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    method = manifest.get("method")
    name = method.get("name") if isinstance(method, dict) else method
    inputs = [i.get("reference") or i.get("path") for i in manifest.get("inputs", []) if isinstance(i, dict)]
    return {"method": name, "inputs": inputs, "manifest": str(folder / "merge_manifest.json")}


@dataclass(frozen=True)
class LmEvalJob:
    model: str                    # folder or hub id
    options: LmEvalOptions
    save_dir: str = "."
    save_name: Optional[str] = None    # default: the model's folder name
    in_memory: bool = False       # load with transformers and evaluate the resident module (lm-eval's HFLM)


def run_lm_eval(job: LmEvalJob) -> tuple[Path, dict]:
    """Evaluate ``job.model`` with lm-eval and write its result file; returns (path, record)."""
    import time

    check_tasks(job.options)       # before any model is loaded
    started = time.time()
    if job.in_memory:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if job.options.backend != "hf":
            raise LmEvalError("in-memory evaluation wraps a transformers model: use backend hf")
        model = AutoModelForCausalLM.from_pretrained(job.model, dtype=job.options.dtype, use_safetensors=True)
        results = evaluate_module(model.to(job.options.device), AutoTokenizer.from_pretrained(job.model), job.options)
    else:
        results = evaluate_folder(job.model, job.options)
    folder = Path(job.model)
    record = result_record(results, job.options, job.model, how="in-memory" if job.in_memory else "on-disk",
                           merge=merge_description(folder) if folder.is_dir() else None, seconds=time.time() - started)
    name = job.save_name or folder.name
    path = write_result(job.save_dir, name, record, results.get("samples") if job.options.log_samples else None)
    return path, record
