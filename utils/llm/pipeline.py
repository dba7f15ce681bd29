"""The paper's two LLM runs, one call each: DARE-then-evaluate one model, and merge-then-evaluate several.

``run_inference(InferenceRun)`` (inference_llms_instruct_math_code.py): with a drop rate p > 0 the
streaming engine writes θ' = θ_pre + DARE(θ_ft − θ_pre) (or DARE(θ_ft) with ``weight_format`` =
finetuned_weight) after the paper's vocabulary alignment (rows added for a pad token are the mean of
the existing rows) to ``<save_dir>/save_models/<dataset>/<save_name>``, evaluates it, and removes it
unless ``keep_model``; with p = 0 the model is evaluated as is.

``run_merge(MergeRun)`` (merge_llms_instruct_math_code.py): the streaming engine writes the merged
checkpoint once to ``<save_dir>/save_merge_models/<tasks>/<save_name>``, each task's benchmarks are
evaluated (in a child process per task when asked, as vLLM allows one engine per process), the
metrics go to ``<save_dir>/save_merge_llm_results/<tasks>/<save_name>.json``.

Both log to ``<save_dir>/save_logs|save_merge_llm_logs/.../<unix time>.log`` (the original's layout).
Result names are the original's (``inference_save_name``, ``merge_save_name``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from model_merging_methods import DareOptions, MergeOptions
from utils.cli import dare_suffix, error_line, interrupted_status, sigterm_as_interrupt
from utils.llm.evaluation import EvalOptions, RecordsError, check_datasets, evaluate_model, result_folder
from utils.llm.generation import resolve_backend_kind
from utils.llm.models import check_backbone, model_label, resolve_model
from utils.records import write_json_atomic

logger = logging.getLogger("mergelm.llm")

DatasetGroups = list[tuple["str | None", list[str]]]   # (task or None, its benchmarks) in evaluation order


@dataclass
class CheckpointSettings:
    """How the streaming engine writes a DARE / merged checkpoint, and whether it is kept."""

    model_dir: str | None = None          # folder searched first for models given by name
    save_dtype: str | None = None         # None: the backbone's dtype
    merge_device: str = "cpu"
    keep_model: bool = False
    allow_backbone_mismatch: bool = False
    allow_pickle: bool = False            # read .bin-only checkpoints (torch.load with weights_only=True)
    files_from: str | None = None         # merge: config/tokenizer source (None: the backbone, as the original)


@dataclass
class InferenceRun:
    """One fine-tuned model, optionally after DARE, on one benchmark (validated by the caller)."""

    finetuned_model_name: str
    dataset_name: str
    evaluation: EvalOptions               # save_name / generator / run_config are filled in by run_inference
    dare: DareOptions = field(default_factory=lambda: DareOptions(drop_rate=0.0, rescale=False))
    backbone_name: str | None = None      # required when dare.drop_rate > 0
    llama2_backbone: bool = False         # the paper's wrong-backbone experiment (also allows the mismatch)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    arguments: dict[str, Any] = field(default_factory=dict)   # the command line, recorded as given


@dataclass
class MergeRun:
    """Merge ``models`` (2 or more, one backbone) with one method, then evaluate ``groups``."""

    models: list[str]                     # names as given (paper names, folders, hub ids)
    tasks: list["str | None"]             # task of each model (selects its tokenizer), None if unknown
    label: str                            # tasks label used in folder names
    groups: DatasetGroups
    evaluation: EvalOptions
    method: str = "average_merging"       # average_merging | task_arithmetic | ties_merging | mask_merging
    mask_apply_method: str = "average_merging"
    scaling_coefficient: float = 1.0
    param_value_mask_rate: float = 0.8
    dare: DareOptions = field(default_factory=lambda: DareOptions(drop_rate=0.0, rescale=False))
    backbone_name: str | None = None      # required unless evaluate_only
    evaluate_only: str | None = None      # evaluate this merged folder instead of merging
    tokenizer_path: str | None = None     # with evaluate_only
    child_command: list[str] | None = None  # evaluate each task by running this command with --evaluate_only
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    arguments: dict[str, Any] = field(default_factory=dict)


def inference_save_name(finetuned_model_name: str, dare: DareOptions, *, llama2_backbone: bool = False) -> str:
    """The original's name: ``<model>_inference_mask_<p>`` (+ ``_rescale_<bool>``, strategy, format, backbone)."""
    name = f"{model_label(finetuned_model_name)}_inference{dare_suffix(dare)}"
    if dare.drop_rate != 0.0 and llama2_backbone:
        name += "_llama_2_as_backbone"
    return name


def merge_save_name(run: MergeRun, num_models: int) -> str:
    """The original's name (``average_merging``, ``task_arithmetic_scaling_coefficient_<λ>``,
    ``mask_merging/<apply>/mask_<p>_<p>[_<p>]_rescale_<bool>``), with TIES and non-default DARE variants added."""
    def method_name(method: str) -> str:
        if method == "task_arithmetic":
            return f"{method}_scaling_coefficient_{run.scaling_coefficient}"
        if method == "ties_merging":
            return f"{method}_scaling_coefficient_{run.scaling_coefficient}_param_value_mask_rate_" \
                   f"{run.param_value_mask_rate}"
        return method

    if run.method != "mask_merging":
        return method_name(run.method)
    rates = "_".join([str(run.dare.drop_rate)] * num_models)
    variant = dare_suffix(run.dare, always_rescale=True).removeprefix(f"_mask_{run.dare.drop_rate}")
    return f"mask_merging/{method_name(run.mask_apply_method)}/mask_{rates}{variant}"


def prompt_suffix(options: EvalOptions) -> str:
    """Result-name suffix of non-paper prompting (empty for the paper's setting, so names stay the original's)."""
    if options.prompt_format == "paper" and options.answer_extraction == "paper":
        return ""
    suffix = f"_prompt_{options.prompt_format}"
    if options.answer_extraction != ("flexible" if options.prompt_format == "chat" else "paper"):
        suffix += f"_extract_{options.answer_extraction}"
    return suffix


def run_with_exit_status(function, run) -> int:
    """Run ``function(run)`` for an entry script: 0 when done; 130 / 143 after Ctrl-C / SIGTERM (the records
    written so far are kept and the log says how to resume); 2 with a one-line message for bad input found
    while running (records that cannot be resumed, a refused checkpoint or output, a backbone mismatch)."""
    import sys

    from model_merging_methods import MergeError
    from utils.engine.reader import CheckpointError
    from utils.llm.generation import PromptTooLongError
    from utils.llm.models import BackboneMismatchError
    from utils.llm.nll import MissingReferenceError
    from utils.records import OutputRefusedError

    try:
        with sigterm_as_interrupt():
            function(run)
    except KeyboardInterrupt as error:
        print("interrupted: finished problems are saved; re-run the same command to resume", file=sys.stderr)
        return interrupted_status(error)
    except (RecordsError, MergeError, CheckpointError, BackboneMismatchError, FileExistsError,
            FileNotFoundError, PromptTooLongError, OutputRefusedError, MissingReferenceError) as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return 2
    return 0


@contextlib.contextmanager
def log_to(log_folder: Path) -> Iterator[Path]:
    """INFO to ``<log_folder>/<unix time>.log`` and to the console (the original's log layout)."""
    log_folder.mkdir(parents=True, exist_ok=True)
    path = log_folder / f"{time.time()}.log"
    root = logging.getLogger()
    previous_level = root.level
    root.setLevel(logging.INFO)
    formatter = logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    handlers = [logging.FileHandler(path, encoding="utf-8"), logging.StreamHandler()]
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.setLevel(logging.INFO)
        root.addHandler(handler)
    try:
        yield path
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(previous_level)


def remove_checkpoint(folder: Path, root: Path) -> None:
    """Delete a written checkpoint and the folders above it (up to ``root``) that it leaves empty."""
    shutil.rmtree(folder, ignore_errors=True)
    parent, stop = folder.parent.resolve(), root.resolve()
    while parent != stop and stop in parent.parents and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _set_threads(num_threads: int | None) -> None:
    """Process-wide torch CPU threads (on a shared machine fewer threads than cores can be much faster)."""
    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)


def _stream(base: str, models: list[str], method: str, output_dir: Path, *, options: MergeOptions | None,
            dare: DareOptions | None, seed: int, checkpoint: CheckpointSettings, files_from: str) -> dict[str, Any]:
    """One streaming-engine run with the paper's pad-row vocabulary alignment; returns its manifest.
    The engine refuses an output folder that is, contains or lies inside an input, before reading anything
    (overwrite=True replaces only an earlier result of the same run name); config.json states the dtype
    of the tensors written."""
    from utils.engine.streaming import StreamMergeJob, run_stream_merge

    job = StreamMergeJob(base_model=base, models=models, method=method, output_dir=str(output_dir),
                         options=options or MergeOptions(), dare=dare, seed=seed, dtype=checkpoint.save_dtype,
                         device=checkpoint.merge_device, overwrite=True, vocab_alignment="pad_mean",
                         files_from=files_from, progress=False, allow_pickle=checkpoint.allow_pickle)
    return run_stream_merge(job)


def run_inference(run: InferenceRun) -> dict[str, Any]:
    """Evaluate one model (after DARE when p > 0); returns the benchmark's summary (also written to disk)."""
    save_name = (inference_save_name(run.finetuned_model_name, run.dare, llama2_backbone=run.llama2_backbone)
                 + prompt_suffix(run.evaluation))
    save_dir = Path(run.evaluation.save_dir)
    with log_to(save_dir / "save_logs" / run.dataset_name / save_name) as log_path:
        logger.info("configuration: %s", run.arguments)
        _set_threads(run.evaluation.num_threads)
        finetuned = resolve_model(run.finetuned_model_name, run.checkpoint.model_dir)
        run_config: dict[str, Any] = {"arguments": run.arguments, "finetuned_resolved": finetuned,
                                      "log": str(log_path),
                                      "backend_resolved": resolve_backend_kind(run.evaluation.backend)}
        options = replace(run.evaluation, save_name=save_name, tasks=None, generator_name=save_name,
                          run_config=run_config)
        check_datasets([run.dataset_name], options)

        model_path, dare_folder = finetuned, None
        if run.dare.drop_rate > 0.0:
            backbone = resolve_model(run.backbone_name, run.checkpoint.model_dir)
            allow = run.checkpoint.allow_backbone_mismatch or run.llama2_backbone
            run_config["backbone_check"] = check_backbone(finetuned, backbone, allow_mismatch=allow)
            run_config["backbone_resolved"] = backbone
            dare_folder = save_dir / "save_models" / run.dataset_name / save_name
            started = time.perf_counter()
            # config and tokenizer of the fine-tuned model, as the original saved the DARE'd fine-tuned model
            run_config["dare_manifest"] = _stream(backbone, [finetuned], "dare", dare_folder, options=None,
                                                  dare=run.dare, seed=run.evaluation.seed, checkpoint=run.checkpoint,
                                                  files_from=finetuned)
            run_config["dare_seconds"] = round(time.perf_counter() - started, 3)
            logger.info("DARE checkpoint written to %s in %.1f s", dare_folder, run_config["dare_seconds"])
            model_path = str(dare_folder)
        try:
            summary = evaluate_model(model_path, [run.dataset_name], options)[0]
        finally:
            if dare_folder is not None and not run.checkpoint.keep_model:
                remove_checkpoint(dare_folder, save_dir)
                logger.info("removed %s (pass --keep_model to keep it)", dare_folder)
        logger.info("metrics: %s", json.dumps(summary["metrics"]))
        return summary


def merge_save_name_of(run: MergeRun) -> str:
    """The result name of ``run``: the merge's name, or the evaluated folder's label with evaluate_only."""
    name = merge_save_name(run, len(run.models)) if run.models else model_label(run.evaluate_only or "")
    return name + prompt_suffix(run.evaluation)


def run_merge(run: MergeRun) -> dict[str, Any]:
    """Merge (unless ``evaluate_only``) then evaluate; returns the metrics per benchmark."""
    save_name = merge_save_name_of(run)
    save_dir = Path(run.evaluation.save_dir)
    with log_to(save_dir / "save_merge_llm_logs" / run.label / save_name) as log_path:
        logger.info("configuration: %s", run.arguments)
        _set_threads(run.evaluation.num_threads)
        run_config: dict[str, Any] = {"arguments": run.arguments, "log": str(log_path), "models": run.models,
                                      "backend_resolved": resolve_backend_kind(run.evaluation.backend)}
        options = replace(run.evaluation, save_name=save_name, tasks=run.label,
                          generator_name=f"{run.label}/{save_name}", run_config=run_config)
        if run.evaluate_only:
            datasets = [dataset for _, group in run.groups for dataset in group]
            check_datasets(datasets, options)
            summaries = evaluate_model(run.evaluate_only, datasets, options, tokenizer_path=run.tokenizer_path)
            return {summary["dataset"]: summary["metrics"] for summary in summaries}
        return _merge_then_evaluate(run, save_name, options, run_config)


def _merge_then_evaluate(run: MergeRun, save_name: str, options: EvalOptions,
                         run_config: dict[str, Any]) -> dict[str, Any]:
    if run.method != "mask_merging" and run.dare.drop_rate > 0:
        logger.warning("--weight_mask_rate is used by mask_merging only; ignored for %s", run.method)
    check_datasets([dataset for _, group in run.groups for dataset in group], options)
    models = [resolve_model(name, run.checkpoint.model_dir) for name in run.models]
    backbone = resolve_model(run.backbone_name, run.checkpoint.model_dir)
    run_config["backbone_resolved"] = backbone
    run_config["backbone_checks"] = [
        check_backbone(model, backbone, allow_mismatch=run.checkpoint.allow_backbone_mismatch) for model in models]

    method = run.mask_apply_method if run.method == "mask_merging" else run.method
    merge_options = MergeOptions(scaling_coefficient=run.scaling_coefficient)
    if method == "ties_merging":
        merge_options = MergeOptions(scaling_coefficient=run.scaling_coefficient,
                                     density=1.0 - run.param_value_mask_rate, ties_trim="per_tensor")
    save_dir = Path(options.save_dir)
    folder = save_dir / "save_merge_models" / run.label / save_name
    started = time.perf_counter()
    # config from the backbone, as the original (merged weights loaded into the pretrained model), unless
    # --files_from; each task is evaluated with its own model's tokenizer (the first model's without a task)
    run_config["merge_manifest"] = _stream(backbone, models, method, folder, options=merge_options,
                                           dare=run.dare if run.method == "mask_merging" else None,
                                           seed=options.seed, checkpoint=run.checkpoint,
                                           files_from=run.checkpoint.files_from or backbone)
    run_config["merge_seconds"] = round(time.perf_counter() - started, 3)
    logger.info("merged checkpoint written to %s in %.1f s", folder, run_config["merge_seconds"])

    tokenizer_of = {task: model for task, model in zip(run.tasks, models) if task}
    results: dict[str, Any] = {}
    keep = run.checkpoint.keep_model
    try:
        for task, datasets in run.groups:
            tokenizer = tokenizer_of.get(task, models[0])
            if run.child_command:
                _evaluate_in_child(run.child_command, folder, task, tokenizer, datasets)
            else:
                evaluate_model(str(folder), datasets, options, tokenizer_path=tokenizer)
            for dataset in datasets:
                summary_path = result_folder(save_dir, dataset, save_name, run.label,
                                             metric=options.metric) / "summary.json"
                results[dataset] = json.loads(summary_path.read_text(encoding="utf-8"))["metrics"]
    except BaseException:
        keep = True    # a failed evaluation keeps the merged folder for --evaluate_only
        raise
    finally:
        if not keep:
            remove_checkpoint(folder, save_dir)
            logger.info("removed %s (pass --keep_model to keep it)", folder)
    overview = save_dir / "save_merge_llm_results" / run.label / f"{save_name}.json"
    write_json_atomic(overview, {"metrics": results, **{k: v for k, v in run_config.items() if k != "arguments"},
                                 "arguments": run.arguments})
    logger.info("metrics: %s -> %s", json.dumps(results), overview)
    return results


def _evaluate_in_child(command: list[str], folder: Path, task: str | None, tokenizer: str | None,
                       datasets: list[str]) -> None:
    """Evaluate ``folder`` by the merge script in a fresh process (vLLM: one engine per process)."""
    command = [*command, "--evaluate_only", str(folder), "--eval_in_child", "never"]
    if task:
        command += ["--evaluate_task", task]
    if tokenizer:
        command += ["--tokenizer_path", tokenizer]
    if not task:
        command += ["--datasets", *datasets]
    logger.info("evaluating %s in a child process: %s", datasets, " ".join(command))
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"evaluation of {datasets} on {folder} failed in the child process "
                           f"(exit status {completed.returncode}); the merged folder is kept for --evaluate_only")
