"""Evaluate a causal LM on the paper's benchmarks: prompts -> generation -> scoring -> files.

Each benchmark's loader, prompt, scorer, metric, standard file and result folder come from its declaration
in ``utils/llm/benchmarks.py``. For each dataset the result folder follows the original's folder names
under ``save_dir``:

* AlpacaEval: ``save_gen_instruct_responses_results/[<tasks>/]alpaca_eval/<save_name>``
* HumanEval / MBPP: ``save_gen_codes_results/[<tasks>/]<human_eval|mbpp>/<save_name>``
* GSM8K / MATH (the original only logged them): ``save_gen_math_results/[<tasks>/]<gsm8k|MATH>/<save_name>``

and holds ``records.jsonl`` (one line per problem: index, task_id, prompt, completion, extracted
answer or cleaned code, gold, correct, and for code the sandbox outcome) and ``summary.json`` (metric,
counts, resolved configuration, seed, decoding, backend, token throughput, data file and checksum,
package versions). Next to the folder the original's combined file is written:
``<save_name>.json`` for AlpacaEval (the ``model_outputs.json`` list of {instruction, output,
generator, dataset} read by ``alpaca_eval --model_outputs``), ``<save_name>.jsonl`` for HumanEval
(human-eval samples: task_id, completion, all_code) and for MBPP (as the original, one JSON array with
one list of completions per problem of the full file, index = position in the file, the format of
bigcode-evaluation-harness ``--load_generations_path``). All files are written atomically.

Metrics: GSM8K / MATH accuracy = correct / problems; HumanEval / MBPP pass@1 = problems whose single
greedy completion passes its tests / problems. AlpacaEval has no local metric (win rate needs a judge).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from utils.llm.benchmarks import DataLocation, ScoringContext, get_benchmark
from utils.llm.data import DatasetSource, Example, slice_examples
from utils.llm.generation import GenerationBackend, make_backend
from utils.llm.prompts import dataset_config, generation_params, load_task_config
from utils.llm.sandbox import SandboxLimits
from utils.records import library_versions, write_json_atomic, write_jsonl_atomic

logger = logging.getLogger(__name__)


def result_folder(save_dir: str | os.PathLike, dataset: str, save_name: str, tasks: str | None = None) -> Path:
    """``<save_dir>/<root>/[<tasks>/]<dataset>/<save_name>`` (root per benchmark, see the module docstring)."""
    base = Path(save_dir) / get_benchmark(dataset).result_root
    if tasks:
        base = base / tasks
    return base / dataset / save_name


@dataclass
class EvalOptions:
    """Settings shared by every dataset of one evaluation run (see the scripts' --help)."""

    save_dir: str = "."
    save_name: str = "model"
    tasks: str | None = None
    generator_name: str | None = None
    backend: str = "auto"
    tensor_parallel_size: int = 1
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    num_threads: int | None = None
    seed: int = 0
    max_tokens: int | None = None
    data_dir: str | None = None
    alpaca_eval_path: str | None = None
    start_index: int = 0
    end_index: int | None = None
    code_timeout: float = 3.0
    code_memory_mb: int = 1024
    code_workers: int = 2
    run_config: dict[str, Any] = field(default_factory=dict)

    def data_location(self) -> DataLocation:
        return DataLocation(data_dir=self.data_dir, alpaca_eval_path=self.alpaca_eval_path)

    def sandbox_limits(self) -> SandboxLimits:
        return SandboxLimits(timeout=self.code_timeout, memory_mb=self.code_memory_mb)


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _selected_examples(dataset: str, options: EvalOptions) -> tuple[list[Example], DatasetSource]:
    """The ``--start_index:--end_index`` slice of the benchmark; ValueError when it is empty."""
    examples, source = get_benchmark(dataset).load(options.data_location())
    selected = slice_examples(examples, options.start_index, options.end_index)
    if not selected:
        raise ValueError(f"{dataset}: no examples in slice [{options.start_index}:{options.end_index}] "
                         f"of {len(examples)} ({source.location})")
    return selected, source


def evaluate_dataset(backend: GenerationBackend, dataset: str, options: EvalOptions) -> dict[str, Any]:
    """Run one dataset end to end with ``backend``; returns the summary (also written to disk)."""
    config = load_task_config()
    benchmark = get_benchmark(dataset)
    examples, source = _selected_examples(dataset, options)
    entry = dataset_config(dataset, config)
    params = generation_params(dataset, max_tokens=options.max_tokens, seed=options.seed, config=config)
    prompts = [benchmark.prompt(example.record, config) for example in examples]
    per_call = int(entry["prompts_per_call"]) if backend.name == "vllm" else len(prompts)
    tokens_before, seconds_before = backend.stats.generated_tokens, backend.stats.seconds
    logger.info("%s: generating %d completions (%s)", dataset, len(prompts), params)
    start = time.perf_counter()
    generations: list[str] = []
    for chunk in _chunks(prompts, per_call):
        generations.extend(backend.generate(chunk, params))
    generation_seconds = time.perf_counter() - start
    rows = benchmark.score(examples, generations, ScoringContext(config, options.sandbox_limits(), options.code_workers))
    scoring_seconds = time.perf_counter() - start - generation_seconds

    folder = result_folder(options.save_dir, dataset, options.save_name, options.tasks)
    records = [{"index": example.index, "task_id": example.task_id, "prompt": prompt, "completion": generation, **row}
               for example, prompt, generation, row in zip(examples, prompts, generations, rows)]
    write_jsonl_atomic(folder / "records.jsonl", records)
    generator = options.generator_name or options.save_name
    standard = benchmark.write_standard(folder, examples, rows, generations, source, generator)

    generated_tokens = backend.stats.generated_tokens - tokens_before
    backend_seconds = backend.stats.seconds - seconds_before
    metrics: dict[str, Any] = {"num_examples": len(examples)}
    if benchmark.metric:
        num_correct = sum(bool(row["correct"]) for row in rows)
        metrics.update({benchmark.metric: num_correct / len(rows), "num_correct": num_correct})
        if benchmark.counts_invalid:
            metrics["num_invalid"] = sum(row["extracted"] is None for row in rows)
    summary = {
        "dataset": dataset,
        "metrics": metrics,
        "save_name": options.save_name,
        "tasks": options.tasks,
        "start_index": options.start_index,
        "end_index": options.end_index,
        "seed": options.seed,
        "decoding": {**asdict(params), "stop": list(params.stop), "prompts_per_call": per_call,
                     "paper_prompts_per_call": entry["prompts_per_call"], "paper_max_tokens": entry["max_tokens"]},
        "prompt_template": config["templates"][entry["template"]],
        "backend": backend.describe(),
        "throughput": {"generated_tokens": generated_tokens, "generation_seconds": round(generation_seconds, 3),
                       "tokens_per_second": round(generated_tokens / backend_seconds, 3) if backend_seconds else None},
        "scoring_seconds": round(scoring_seconds, 3),
        "code_sandbox": asdict(options.sandbox_limits()) if benchmark.executes_code else None,
        "data": asdict(source),
        "outputs": {"records": str(folder / "records.jsonl"), "summary": str(folder / "summary.json"),
                    "standard": str(standard) if standard else None},
        "config": options.run_config,
        "versions": library_versions(),
    }
    write_json_atomic(folder / "summary.json", summary)
    logger.info("%s: %s -> %s", dataset, metrics, folder)
    return summary


def evaluate_model(model_path: str, datasets: Sequence[str], options: EvalOptions, *,
                   tokenizer_path: str | None = None) -> list[dict[str, Any]]:
    """Load ``model_path`` once (one engine) and evaluate it on each dataset in order."""
    backend = make_backend(options.backend, model_path, tokenizer_path=tokenizer_path,
                           tensor_parallel_size=options.tensor_parallel_size, batch_size=options.batch_size,
                           device=options.device, dtype=options.dtype, seed=options.seed,
                           num_threads=options.num_threads)
    try:
        return [evaluate_dataset(backend, dataset, options) for dataset in datasets]
    finally:
        backend.close()


def check_datasets(datasets: Sequence[str], options: EvalOptions) -> dict[str, int]:
    """Load every dataset and its slice before any expensive work; returns examples per dataset.
    Raises the loader's error (naming the missing file / variable) or ValueError for an empty slice."""
    return {dataset: len(_selected_examples(dataset, options)[0]) for dataset in datasets}
