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

Records are appended after every generation call (one batch; each line written whole and flushed to
disk), so an interrupted or killed run keeps what it finished: re-running the same command resumes
(``resume``, the default; ``restart`` discards the records). ``run_settings.json`` in the folder holds the
settings that determine the records (flags except slicing, threads and batching; data checksum; prompt
and decoding); a resume with different settings is refused naming the first differing one. A torn
last line (a kill during the write) is dropped with a warning and regenerated. The summary and the
standard files are computed from the records of the current slice.

With ``metric="nll"`` no text is generated: utils/llm/nll.py scores the reference solutions (folder
``save_nll_results/``).

Metrics: GSM8K / MATH accuracy = correct / problems; HumanEval / MBPP pass@1 = problems whose single
greedy completion passes its tests / problems. AlpacaEval has no local metric (win rate needs a judge).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from utils.llm.benchmarks import DataLocation, ScoringContext, get_benchmark
from utils.llm.data import DatasetSource, Example, slice_examples
from utils.llm.generation import GenerationBackend, make_backend
from utils.llm.prompts import dataset_config, generation_params, load_task_config
from utils.llm.sandbox import SandboxLimits
from utils.records import library_versions, write_json_atomic, write_jsonl_atomic, write_text_atomic

logger = logging.getLogger(__name__)


def result_folder(save_dir: str | os.PathLike, dataset: str, save_name: str, tasks: str | None = None, *,
                  metric: str = "generate") -> Path:
    """``<save_dir>/<root>/[<tasks>/]<dataset>/<save_name>`` (root per benchmark, see the module docstring;
    ``save_nll_results`` for ``metric="nll"``)."""
    if metric == "nll":
        from utils.llm.nll import nll_folder
        return nll_folder(save_dir, dataset, save_name, tasks)
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
    prompt_format: str = "paper"          # "chat": the model's own chat template (see configs/llm_tasks.yaml)
    answer_extraction: str = "paper"      # "flexible": also #### N, \\boxed{}, a last number
    resume: bool = True                   # False (--restart): discard the records of an earlier run
    metric: str = "generate"              # "nll": teacher-forced answer NLL of the references (utils/llm/nll.py)
    run_config: dict[str, Any] = field(default_factory=dict)

    def data_location(self) -> DataLocation:
        return DataLocation(data_dir=self.data_dir, alpaca_eval_path=self.alpaca_eval_path)

    def sandbox_limits(self) -> SandboxLimits:
        return SandboxLimits(timeout=self.code_timeout, memory_mb=self.code_memory_mb)


# Flags that change how fast records are produced, or which of them are used, but not their content.
NON_RECORD_FLAGS = frozenset({"start_index", "end_index", "num_threads", "batch_size", "code_workers", "keep_model",
                              "restart", "eval_in_child", "save_dir", "model_dir", "data_dir", "alpaca_eval_path",
                              "tensor_parallel_size", "merge_device", "device"})


class RecordsError(ValueError):
    """Existing records cannot be resumed: other settings, or a damaged line before the last."""


class RecordsFile:
    """``records.jsonl`` appended one generation call at a time; lines are keyed by the example index."""

    def __init__(self, folder: Path, settings: dict[str, Any], *, resume: bool) -> None:
        self.path = folder / "records.jsonl"
        self.settings_path = folder / "run_settings.json"
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = self._take_lock(folder)
        try:
            self.done: dict[int, dict[str, Any]] = {}
            if resume and self.path.exists():
                self._check_settings(settings)
                self.done = self._read()
            else:
                self.path.unlink(missing_ok=True)
            write_json_atomic(self.settings_path, settings)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _take_lock(folder: Path) -> int:
        """An flock on ``<folder>/.records.lock`` for the whole evaluation: a second evaluation of the same
        name, started meanwhile, is refused instead of appending to the same records (the kernel drops
        the lock when this process ends, however it ends)."""
        import fcntl

        path = folder / ".records.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 100).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RecordsError(f"{folder} is being written by another evaluation ({holder}); wait for it to "
                               f"finish, or give this run another --save_name") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        return fd

    def close(self) -> None:
        """Release the folder's lock (once the evaluation's files are written)."""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def _check_settings(self, settings: dict[str, Any]) -> None:
        if not self.settings_path.exists():
            raise RecordsError(f"{self.path} exists without {self.settings_path.name}; pass --restart to discard it")
        try:
            recorded = json.loads(self.settings_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise RecordsError(f"{self.settings_path} is not valid JSON ({error}); the records cannot be checked "
                               f"against this run's settings: pass --restart to discard them") from None
        if not isinstance(recorded, dict):
            raise RecordsError(f"{self.settings_path} holds a {type(recorded).__name__}, not the settings object; "
                               f"pass --restart to discard the records")
        refuse_other_settings(self.path, recorded, settings, set(recorded) | set(settings))

    def _read(self) -> dict[int, dict[str, Any]]:
        done: dict[int, dict[str, Any]] = {}
        lines = self.path.read_text(encoding="utf-8").split("\n")
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                done[int(row["index"])] = row
                kept.append(line)
            except (ValueError, KeyError, TypeError):
                if any(rest.strip() for rest in lines[number:]):
                    raise RecordsError(f"{self.path}: line {number} is not a record (only a torn last line is "
                                     f"repaired); pass --restart to discard the file") from None
                logger.warning("%s: dropped a torn last line (%d characters); it will be generated again",
                               self.path, len(line))
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        return done

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Each row becomes one line written by a single write call, then flushed to disk."""
        with open(self.path, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                self.done[int(row["index"])] = row
            handle.flush()
            os.fsync(handle.fileno())


def _flag_settings(dataset: str, options: EvalOptions, source: DatasetSource) -> dict[str, Any]:
    """The record settings known before any model loads (flags, data): checked first on resume."""
    arguments = options.run_config.get("arguments", {})
    return {
        "dataset": dataset, "save_name": options.save_name, "prompt_format": options.prompt_format,
        "answer_extraction": options.answer_extraction, "data_sha256": source.sha256,
        **{f"--{key}": value for key, value in sorted(arguments.items()) if key not in NON_RECORD_FLAGS},
    }


def _record_settings(dataset: str, options: EvalOptions, params: Any, prompts: list[str],
                     source: DatasetSource) -> dict[str, Any]:
    """What determines a record's content: used to refuse a resume with other settings."""
    return {**_flag_settings(dataset, options, source), "decoding": {**asdict(params), "stop": list(params.stop)}}


def _precheck_resume(dataset: str, options: EvalOptions, source: DatasetSource) -> None:
    """A resume whose flags differ from the records' is refused before torch and the model load (RecordsFile
    checks everything again, decoding included, once the model is there). Unreadable settings are left to it."""
    folder = result_folder(options.save_dir, dataset, options.save_name, options.tasks)
    settings_path = folder / "run_settings.json"
    if not options.resume or not (folder / "records.jsonl").exists() or not settings_path.exists():
        return
    try:
        recorded = json.loads(settings_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return
    if not isinstance(recorded, dict):
        return
    settings = _flag_settings(dataset, options, source)
    refuse_other_settings(folder / "records.jsonl", recorded, settings, set(settings))


def refuse_other_settings(path: Path, recorded: dict[str, Any], settings: dict[str, Any], keys: set[str]) -> None:
    """RecordsError naming the first of `keys` (sorted) whose recorded value differs from this run's."""
    for key in sorted(keys):
        if recorded.get(key) != settings.get(key):
            raise RecordsError(f"{path} was written with {key} = {recorded.get(key)!r}, this run has "
                               f"{settings.get(key)!r}; use the same setting to resume, or --restart")


def _eta(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _prompts(backend: GenerationBackend, benchmark: Any, examples: Sequence[Example], config: dict,
             prompt_format: str) -> list[str]:
    if prompt_format == "chat":
        return [backend.chat_prompt(benchmark.chat_message(example.record, config)) for example in examples]
    return [benchmark.prompt(example.record, config) for example in examples]


def _selected_examples(dataset: str, options: EvalOptions) -> tuple[list[Example], DatasetSource]:
    """The ``--start_index:--end_index`` slice of the benchmark; ValueError when it is empty."""
    examples, source = get_benchmark(dataset).load(options.data_location())
    selected = slice_examples(examples, options.start_index, options.end_index)
    if not selected:
        raise ValueError(f"{dataset}: no examples in slice [{options.start_index}:{options.end_index}] "
                         f"of {len(examples)} ({source.location})")
    return selected, source


def evaluate_dataset(backend: GenerationBackend, dataset: str, options: EvalOptions) -> dict[str, Any]:
    """Run one dataset end to end with ``backend`` (resuming from its records); returns the summary."""
    config = load_task_config()
    benchmark = get_benchmark(dataset)
    examples, source = _selected_examples(dataset, options)
    entry = dataset_config(dataset, config)
    params = generation_params(dataset, max_tokens=options.max_tokens, seed=options.seed, config=config)
    if options.prompt_format == "chat":
        params = replace(params, stop=tuple(config.get("chat", {}).get("stop", [])))
    prompts = _prompts(backend, benchmark, examples, config, options.prompt_format)
    folder = result_folder(options.save_dir, dataset, options.save_name, options.tasks)
    records = RecordsFile(folder, _record_settings(dataset, options, params, prompts, source), resume=options.resume)
    try:
        todo = [position for position, example in enumerate(examples) if example.index not in records.done]
        resumed = len(examples) - len(todo)
        per_call = int(entry["prompts_per_call"]) if backend.name == "vllm" else len(prompts)
        context = ScoringContext(config, options.sandbox_limits(), options.code_workers,
                                 answer_extraction=options.answer_extraction,
                                 code_from_fence=options.prompt_format == "chat")
        tokens_before, seconds_before = backend.stats.generated_tokens, backend.stats.seconds
        logger.info("%s: %d problems, %d already in %s, generating %d (%s)", dataset, len(examples), resumed,
                    records.path, len(todo), params)
        start = time.perf_counter()
        scoring_seconds = 0.0
        finished = 0
        try:
            for call in backend.schedule([prompts[position] for position in todo], per_call):
                positions = [todo[member] for member in call]
                generations = backend.generate([prompts[position] for position in positions], params)
                scored_at = time.perf_counter()
                chosen = [examples[position] for position in positions]
                rows = benchmark.score(chosen, generations, context)
                scoring_seconds += time.perf_counter() - scored_at
                records.append([{"index": example.index, "task_id": example.task_id, "prompt": prompts[position],
                                 "completion": generation, **row}
                                for position, example, generation, row in zip(positions, chosen, generations, rows)])
                finished += len(positions)
                elapsed = time.perf_counter() - start
                tokens = backend.stats.generated_tokens - tokens_before
                busy = backend.stats.seconds - seconds_before
                logger.info("%s: %d/%d problems done (%d resumed), %.1f tokens/s, ETA %s", dataset, resumed + finished,
                            len(examples), resumed, tokens / busy if busy else 0.0,
                            _eta(elapsed / finished * (len(todo) - finished)))
        except KeyboardInterrupt:
            logger.warning("%s: interrupted with %d/%d problems saved in %s; run the same command again to resume "
                           "(--restart starts over)", dataset, resumed + finished, len(examples), records.path)
            raise
        generation_seconds = time.perf_counter() - start - scoring_seconds

        rows = [records.done[example.index] for example in examples]
        # In the benchmark's order (appends came batch by batch); records of other slices are kept.
        write_jsonl_atomic(records.path, [records.done[index] for index in sorted(records.done)])
        generations = [row["completion"] for row in rows]
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
            "prompt_format": options.prompt_format,
            "answer_extraction": options.answer_extraction,
            "resumed_examples": resumed,
            "decoding": {**asdict(params), "stop": list(params.stop), "prompts_per_call": per_call,
                         "paper_prompts_per_call": entry["prompts_per_call"], "paper_max_tokens": entry["max_tokens"]},
            "prompt_template": (config["chat"]["instructions"][dataset] if options.prompt_format == "chat"
                                else config["templates"][entry["template"]]),
            "backend": backend.describe(),
            "throughput": {"generated_tokens": generated_tokens, "generation_seconds": round(generation_seconds, 3),
                           "tokens_per_second": round(generated_tokens / backend_seconds, 3) if backend_seconds else None},
            "scoring_seconds": round(scoring_seconds, 3),
            "code_sandbox": asdict(options.sandbox_limits()) if benchmark.executes_code else None,
            "data": asdict(source),
            "outputs": {"records": str(records.path), "summary": str(folder / "summary.json"),
                        "standard": str(standard) if standard else None},
            "config": options.run_config,
            "versions": library_versions(),
        }
        write_json_atomic(folder / "summary.json", summary)
        logger.info("%s: %s -> %s", dataset, metrics, folder)
        return summary
    finally:
        records.close()   # the folder's lock: held until the files above are written


def evaluate_model(model_path: str, datasets: Sequence[str], options: EvalOptions, *,
                   tokenizer_path: str | None = None) -> list[dict[str, Any]]:
    """Load ``model_path`` once (one engine) and evaluate it on each dataset in order (``metric="nll"``:
    the answer NLL of the reference solutions, utils/llm/nll.py, instead of generation and scoring)."""
    if options.metric == "nll":
        from utils.llm.nll import evaluate_nll
        return evaluate_nll(model_path, datasets, options, tokenizer_path=tokenizer_path)
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
    Raises the loader's error (naming the missing file / variable), ValueError for an empty slice,
    RecordsError for a resume whose flags differ from the records', or MissingReferenceError
    (``metric="nll"``) for a record without its reference response."""
    counts = {}
    for dataset in datasets:
        examples, source = _selected_examples(dataset, options)
        if options.metric != "nll":
            _precheck_resume(dataset, options, source)
        if options.metric == "nll":   # every reference present before any model loads
            from utils.llm.nll import reference_pairs
            reference_pairs(dataset, examples, load_task_config(), chat=options.prompt_format == "chat")
        counts[dataset] = len(examples)
    return counts
