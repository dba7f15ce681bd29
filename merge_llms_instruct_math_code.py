r"""Merge 2-3 fine-tuned LLMs of one backbone (streaming, low memory), then evaluate the merged model.

The paper's commands run unchanged, e.g.
    python merge_llms_instruct_math_code.py --merge_instruct --merge_math --merging_method_name mask_merging \
        --use_weight_rescale --weight_mask_rate 0.2 --mask_apply_method task_arithmetic --tensor_parallel_size 1

Methods (θ_k fine-tuned, δ_k = θ_k − θ_pre, K models, λ = --scaling_coefficient):
  average_merging  θ = (1/K) Σ_k θ_k
  task_arithmetic  θ = θ_pre + λ Σ_k δ_k
  ties_merging     θ = θ_pre + λ · disjoint-mean(elect-sign(trim(δ_k))), trim keeps the top
                   (1 − --param_value_mask_rate) |δ| of each tensor (per-tensor, as the paper's LLM TIES)
  mask_merging     DARE first, δ_k ← δ_k ⊙ (1 − m_k) / (1 − p), m_k ~ Bernoulli(p), then --mask_apply_method
Models: --merge_instruct / --merge_math / --merge_code pick the paper's WizardLM-13B-V1.2,
WizardMath-13B-V1.0 and llama-2-13b-code-alpaca (backbone Llama-2-13b-hf); --models_to_merge with
--pretrained_model_name takes any folders or hub ids. The merged checkpoint is written once to
<save_dir>/save_merge_models/<tasks>/<save_name> (deleted after evaluation unless --keep_model) and
evaluated on each task's benchmarks (instruct: AlpacaEval; math: GSM8K, MATH; code: HumanEval, MBPP),
each task in a child process when the backend is vLLM (one engine per process). --evaluate_only FOLDER
evaluates an already merged folder in this process (the original's direct_inference script).
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from inference_llms_instruct_math_code import (HelpFormatter, add_evaluation_arguments, check_backbone, dare_options,
                                               eval_options, log_to, model_label, remove_checkpoint, resolve_model,
                                               set_threads)
from utils.llm.generation import resolve_backend_kind
from utils.llm.evaluation import check_datasets, evaluate_model, result_folder
from utils.records import write_json_atomic
from utils.llm.prompts import DATASETS, load_task_config, model_entry, task_datasets

TASKS = ("instruct", "math", "code")
METHODS = ("average_merging", "task_arithmetic", "ties_merging", "mask_merging")
APPLY_METHODS = ("average_merging", "task_arithmetic", "ties_merging")
logger = logging.getLogger("mergelm.llm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--merge_instruct", action="store_true", help="merge WizardLM-13B-V1.2 (task instruct)")
    parser.add_argument("--merge_math", action="store_true", help="merge WizardMath-13B-V1.0 (task math)")
    parser.add_argument("--merge_code", action="store_true", help="merge llama-2-13b-code-alpaca (task code)")
    parser.add_argument("--models_to_merge", nargs="+", default=None,
                        help="instead of the three flags: fine-tuned folders / hub ids / paper names")
    parser.add_argument("--model_tasks", nargs="+", default=None, choices=TASKS,
                        help="task of each --models_to_merge entry (selects benchmarks and tokenizer)")
    parser.add_argument("--pretrained_model_name", default=None,
                        help="backbone θ_pre (default: the paper's common backbone of the models)")
    parser.add_argument("--merging_method_name", default="average_merging", choices=METHODS,
                        help="mask_merging = DARE + --mask_apply_method")
    parser.add_argument("--scaling_coefficient", type=float, default=1.0,
                        help="λ of task arithmetic / TIES")
    parser.add_argument("--param_value_mask_rate", type=float, default=0.8,
                        help="TIES: fraction of each delta tensor trimmed (smallest |δ|)")
    parser.add_argument("--mask_apply_method", default="average_merging", choices=APPLY_METHODS,
                        help="merge applied after DARE in mask_merging")
    parser.add_argument("--datasets", nargs="+", default=None, choices=list(DATASETS),
                        help="benchmarks to run (default: those of the merged tasks)")
    parser.add_argument("--evaluate_only", default=None, metavar="FOLDER",
                        help="evaluate this already merged folder instead of merging")
    parser.add_argument("--evaluate_task", default=None, choices=TASKS,
                        help="with --evaluate_only: evaluate this task's benchmarks only")
    parser.add_argument("--tokenizer_path", default=None,
                        help="with --evaluate_only: tokenizer folder / hub id (default: the merged folder's)")
    parser.add_argument("--eval_in_child", default="auto", choices=["auto", "always", "never"],
                        help="evaluate each task in a child process (auto: only with vLLM)")
    add_evaluation_arguments(parser)
    return parser


def merge_members(args: argparse.Namespace) -> tuple[list[str], list[str | None], str]:
    """(model names, task per model, tasks label used in folder names)."""
    config = load_task_config()
    flags = (args.merge_instruct, args.merge_math, args.merge_code)
    if args.evaluate_only and not args.models_to_merge and not any(flags):
        return [], [], "evaluate_only"
    if args.models_to_merge:
        if any(flags):
            raise SystemExit("use either --merge_instruct/--merge_math/--merge_code or --models_to_merge, not both")
        names = list(args.models_to_merge)
        if args.model_tasks is not None and len(args.model_tasks) != len(names):
            raise SystemExit(f"--model_tasks has {len(args.model_tasks)} entries for {len(names)} models")
        tasks = list(args.model_tasks) if args.model_tasks else [None] * len(names)
        label = "_".join(task or model_label(name) for task, name in zip(tasks, names))
    else:
        tasks = [task for task, flag in zip(TASKS, flags) if flag]
        names = [config["merge_task_models"][task] for task in tasks]
        label = "_".join(tasks)
    if len(names) < 2:
        raise SystemExit("should merge two models at least (two of --merge_instruct/--merge_math/--merge_code, "
                         "or two or more --models_to_merge)")
    return names, tasks, label


def merge_save_name(args: argparse.Namespace, num_models: int) -> str:
    """The original's name (``average_merging``, ``task_arithmetic_scaling_coefficient_<λ>``,
    ``mask_merging/<apply>/mask_<p>_<p>[_<p>]_rescale_<bool>``), with TIES and non-default DARE variants added."""
    def method_name(method: str) -> str:
        if method == "task_arithmetic":
            return f"{method}_scaling_coefficient_{args.scaling_coefficient}"
        if method == "ties_merging":
            return f"{method}_scaling_coefficient_{args.scaling_coefficient}_param_value_mask_rate_" \
                   f"{args.param_value_mask_rate}"
        return method

    if args.merging_method_name != "mask_merging":
        return method_name(args.merging_method_name)
    rates = "_".join([str(args.weight_mask_rate)] * num_models)
    name = f"mask_merging/{method_name(args.mask_apply_method)}/mask_{rates}_rescale_{args.use_weight_rescale}"
    if args.mask_strategy == "magnitude":
        name += f"_strategy_{args.mask_strategy}"
    if args.weight_format == "finetuned_weight":
        name += f"_weight_format_{args.weight_format}"
    return name


def stream_job(args: argparse.Namespace, backbone: str, models: list[str], output_dir: Path):
    """The streaming engine's job for the requested method (DARE options only for mask_merging)."""
    from model_merging_methods import MergeOptions
    from utils.engine.streaming import StreamMergeJob

    method = args.mask_apply_method if args.merging_method_name == "mask_merging" else args.merging_method_name
    options = MergeOptions(scaling_coefficient=args.scaling_coefficient)
    if method == "ties_merging":
        options = MergeOptions(scaling_coefficient=args.scaling_coefficient,
                               density=1.0 - args.param_value_mask_rate, ties_trim="per_tensor")
    dare = dare_options(args) if args.merging_method_name == "mask_merging" else None
    return StreamMergeJob(base_model=backbone, models=models, method=method, output_dir=str(output_dir),
                          options=options, dare=dare, seed=args.seed, dtype=args.save_dtype, device=args.merge_device,
                          overwrite=True, vocab_alignment="pad_mean", files_from=models[0], progress=False)


def _datasets_for(args: argparse.Namespace, tasks: list[str | None]) -> list[tuple[str | None, list[str]]]:
    """(task, datasets) groups to evaluate; one group when --datasets is given."""
    if args.datasets:
        return [(None, list(args.datasets))]
    if any(task is None for task in tasks):
        raise SystemExit("pass --datasets (or --model_tasks) to choose the benchmarks of --models_to_merge")
    return [(task, task_datasets(task)) for task in tasks]


def _child_argv(argv: list[str], folder: Path, task: str | None, tokenizer: str | None) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--evaluate_only", str(folder),
               "--eval_in_child", "never"]
    if task:
        command += ["--evaluate_task", task]
    if tokenizer:
        command += ["--tokenizer_path", tokenizer]
    return command


def _evaluate_only(args: argparse.Namespace, tasks: list[str | None], label: str, save_name: str,
                   run_config: dict[str, Any]) -> list[dict[str, Any]]:
    folder = Path(args.evaluate_only)
    if not folder.is_dir():
        raise SystemExit(f"--evaluate_only: {folder} is not a folder")
    if args.evaluate_task:
        datasets = list(args.datasets) if args.datasets else task_datasets(args.evaluate_task)
    else:
        datasets = [dataset for _, group in _datasets_for(args, tasks) for dataset in group]
    options = eval_options(args, save_name=save_name, tasks=label, generator_name=f"{label}/{save_name}",
                           run_config=run_config)
    check_datasets(datasets, options)
    return evaluate_model(str(folder), datasets, options, tokenizer_path=args.tokenizer_path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.weight_mask_rate < 1.0:
        raise SystemExit(f"--weight_mask_rate must be in [0, 1), got {args.weight_mask_rate}")
    names, tasks, label = merge_members(args)
    save_name = merge_save_name(args, len(names)) if names else model_label(args.evaluate_only)
    with log_to(Path(args.save_dir) / "save_merge_llm_logs" / label / save_name) as log_path:
        return _run(args, argv, names, tasks, label, save_name, log_path)


def _run(args: argparse.Namespace, argv: list[str], names: list[str], tasks: list[str | None], label: str,
         save_name: str, log_path: Path) -> int:
    logger.info("configuration: %s", vars(args))
    set_threads(args.num_threads)
    run_config: dict[str, Any] = {"arguments": vars(args), "log": str(log_path), "models": names,
                                  "backend_resolved": resolve_backend_kind(args.backend)}
    if args.evaluate_only:
        _evaluate_only(args, tasks, label, save_name, run_config)
        return 0
    if args.merging_method_name != "mask_merging" and args.weight_mask_rate > 0:
        logger.warning("--weight_mask_rate is used by mask_merging only; ignored for %s", args.merging_method_name)
    groups = _datasets_for(args, tasks)
    check_datasets([dataset for _, group in groups for dataset in group],
                   eval_options(args, save_name=save_name, tasks=label, generator_name=save_name, run_config={}))

    models = [resolve_model(name, args.model_dir) for name in names]
    backbone_name = args.pretrained_model_name
    if backbone_name is None:
        backbones = {entry.backbone if (entry := model_entry(name)) else None for name in names}
        if len(backbones) != 1 or None in backbones:
            raise SystemExit(f"the backbone of all the fine-tuned models should be the same and known; got "
                             f"{sorted(map(str, backbones))} — pass --pretrained_model_name")
        backbone_name = backbones.pop()
    backbone = resolve_model(backbone_name, args.model_dir)
    run_config["backbone_resolved"] = backbone
    run_config["backbone_checks"] = [check_backbone(model, backbone, allow_mismatch=args.allow_backbone_mismatch)
                                     for model in models]

    from utils.engine.streaming import run_stream_merge

    folder = Path(args.save_dir) / "save_merge_models" / label / save_name
    started = time.perf_counter()
    run_config["merge_manifest"] = run_stream_merge(stream_job(args, backbone, models, folder))
    run_config["merge_seconds"] = round(time.perf_counter() - started, 3)
    logger.info("merged checkpoint written to %s in %.1f s", folder, run_config["merge_seconds"])

    in_child = args.eval_in_child == "always" or (args.eval_in_child == "auto"
                                                  and run_config["backend_resolved"] == "vllm")
    tokenizer_of = {task: model for task, model in zip(tasks, models) if task}
    results: dict[str, Any] = {}
    try:
        for task, datasets in groups:
            tokenizer = tokenizer_of.get(task) if task else None
            if in_child:
                command = _child_argv(argv, folder, task, tokenizer)
                if not task:
                    command += ["--datasets", *datasets]
                logger.info("evaluating %s in a child process: %s", datasets, " ".join(command))
                completed = subprocess.run(command, check=False)
                if completed.returncode != 0:
                    raise RuntimeError(f"evaluation of {datasets} on {folder} failed in the child process "
                                       f"(exit status {completed.returncode}); the merged folder is kept for "
                                       f"--evaluate_only")
            else:
                options = eval_options(args, save_name=save_name, tasks=label,
                                       generator_name=f"{label}/{save_name}", run_config=run_config)
                evaluate_model(str(folder), datasets, options, tokenizer_path=tokenizer)
            for dataset in datasets:
                summary_path = result_folder(args.save_dir, dataset, save_name, label) / "summary.json"
                results[dataset] = json.loads(summary_path.read_text(encoding="utf-8"))["metrics"]
    except BaseException:
        args.keep_model = True
        raise
    finally:
        if not args.keep_model:
            remove_checkpoint(folder, Path(args.save_dir))
            logger.info("removed %s (pass --keep_model to keep it)", folder)
    overview = Path(args.save_dir) / "save_merge_llm_results" / label / f"{save_name}.json"
    write_json_atomic(overview, {"metrics": results, **{k: v for k, v in run_config.items() if k != "arguments"},
                                 "arguments": vars(args)})
    logger.info("metrics: %s -> %s", json.dumps(results), overview)
    return 0


if __name__ == "__main__":
    sys.exit(main())
