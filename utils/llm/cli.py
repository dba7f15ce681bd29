"""Command-line flags of the two LLM entry scripts, declared once, and their conversion to run options.

``add_evaluation_arguments`` declares the flags both scripts share (data, slicing, backend, outputs, the
paper's DARE flags from ``utils/cli.py`` plus ``--seed``); ``inference_run`` / ``merge_run`` validate the
parsed flags once (bad input: SystemExit with a one-line message) and build the dataclasses that
``utils/llm/pipeline.py`` runs. Nothing past this module sees an ``argparse.Namespace``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from utils.cli import add_dare_arguments, dare_options_from_args
from utils.llm.benchmarks import DATASETS
from utils.llm.evaluation import EvalOptions
from utils.llm.generation import BACKEND_KINDS
from utils.llm.models import MODEL_DIR_ENV, backbone_name, common_backbone, model_label
from utils.llm.pipeline import CheckpointSettings, DatasetGroups, InferenceRun, MergeRun
from utils.llm.prompts import load_task_config, task_datasets

TASKS = ("instruct", "math", "code")
MERGE_METHODS = ("average_merging", "task_arithmetic", "ties_merging", "mask_merging")
APPLY_METHODS = ("average_merging", "task_arithmetic", "ties_merging")


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by inference_llms_instruct_math_code.py and merge_llms_instruct_math_code.py."""
    parser.add_argument("--start_index", type=int, default=0, help="first example (Python slice start)")
    parser.add_argument("--end_index", type=int, default=None,
                        help="end of the slice (exclusive; default: through the last example)")
    parser.add_argument("--tensor_parallel_size", type=int, default=1, help="GPUs per vLLM engine")
    add_dare_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the DARE masks and of sampling")
    parser.add_argument("--backend", default="auto", choices=BACKEND_KINDS,
                        help="auto: vLLM when installed and a GPU is visible, else transformers")
    parser.add_argument("--batch_size", type=int, default=8, help="transformers backend: prompts per forward batch")
    parser.add_argument("--device", default="auto", help="transformers backend: auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="inference dtype (auto: float32 on CPU, the checkpoint's half dtype or float16 on GPU)")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="torch CPU threads of the transformers backend (the merge engine sets its own)")
    parser.add_argument("--max_tokens", type=int, default=None,
                        help="override the paper's max new tokens per dataset (quick runs only)")
    parser.add_argument("--data_dir", default=None,
                        help="folder with gsm8k_test.jsonl, MATH_test.jsonl, mbpp.test.jsonl "
                             "(default: $MATH_CODE_DATA_DIR, else ./math_code_data)")
    parser.add_argument("--alpaca_eval_path", default=None,
                        help="local AlpacaEval JSON (default: $ALPACA_EVAL_PATH, else the hub)")
    parser.add_argument("--model_dir", default=None,
                        help=f"folder searched first for models given by name (default: ${MODEL_DIR_ENV})")
    parser.add_argument("--save_dir", default=".", help="root of the output folders (save_models/, save_gen_*/, ...)")
    parser.add_argument("--keep_model", action="store_true", help="keep the DARE / merged checkpoint")
    parser.add_argument("--save_dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="dtype of the written checkpoint (default: the backbone's)")
    parser.add_argument("--merge_device", default="cpu", help="device of the streaming engine (cpu or cuda)")
    parser.add_argument("--code_timeout", type=float, default=3.0, help="seconds per HumanEval/MBPP program")
    parser.add_argument("--code_memory_mb", type=int, default=1024, help="address-space limit per program (MiB)")
    parser.add_argument("--code_workers", type=int, default=2, help="programs executed in parallel")
    parser.add_argument("--prompt_format", default="paper", choices=["paper", "chat"],
                        help="paper: the original's templates; chat: the model's own chat template with the task "
                             "instruction of configs/llm_tasks.yaml (chat.instructions), code taken from fenced blocks")
    parser.add_argument("--metric", default="generate", choices=["generate", "nll"],
                        help="generate: generate and score (accuracy / pass@1); nll: teacher-forced NLL per token of the "
                             "benchmark's reference solutions, one forward pass, no generation (utils/llm/nll.py; "
                             "folder save_nll_results/; transformers backend)")
    parser.add_argument("--answer_extraction", default="auto", choices=["auto", "paper", "flexible"],
                        help="GSM8K/MATH answers: paper = after 'The answer is: ' only; flexible = also '#### N', "
                             "\\boxed{}, 'answer is N', a last number (auto: flexible with chat prompts, else paper)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="restart", action="store_false", default=False,
                        help="continue from the records of an interrupted run with the same settings (the default)")
    resume.add_argument("--restart", dest="restart", action="store_true",
                        help="discard the records of an earlier run and generate everything again")
    parser.add_argument("--allow_backbone_mismatch", action="store_true",
                        help="proceed when the backbone's architecture or RoPE differs from the fine-tuned model's")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="accept .bin-only checkpoints (read with torch.load(weights_only=True)); refused "
                             "otherwise, as pickles can run code")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The inference script's own flags (model, backbone, benchmark) and the shared ones."""
    parser.add_argument("--finetuned_model_name", default="WizardLM-13B-V1.2",
                        help="paper model name (see configs/llm_tasks.yaml), local folder or hub id")
    parser.add_argument("--pretrained_model_name", default=None,
                        help="backbone θ_pre (folder or hub id; default: the paper's backbone of the model)")
    parser.add_argument("--dataset_name", default="alpaca_eval", choices=list(DATASETS), help="benchmark")
    parser.add_argument("--wizardcoder_use_llama2_as_backbone", action="store_true",
                        help="paper's wrong-backbone experiment: Llama-2 as θ_pre of WizardCoder-Python-7B/13B")
    add_evaluation_arguments(parser)


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """The merge script's own flags (models, method, benchmarks, evaluate-only) and the shared ones."""
    parser.add_argument("--merge_instruct", action="store_true", help="merge WizardLM-13B-V1.2 (task instruct)")
    parser.add_argument("--merge_math", action="store_true", help="merge WizardMath-13B-V1.0 (task math)")
    parser.add_argument("--merge_code", action="store_true", help="merge llama-2-13b-code-alpaca (task code)")
    parser.add_argument("--models_to_merge", nargs="+", default=None,
                        help="instead of the three flags: fine-tuned folders / hub ids / paper names")
    parser.add_argument("--model_tasks", nargs="+", default=None, choices=TASKS,
                        help="task of each --models_to_merge entry (selects benchmarks and tokenizer)")
    parser.add_argument("--pretrained_model_name", default=None,
                        help="backbone θ_pre (default: the paper's common backbone of the models)")
    parser.add_argument("--merging_method_name", default="average_merging", choices=MERGE_METHODS,
                        help="mask_merging = DARE + --mask_apply_method")
    parser.add_argument("--scaling_coefficient", type=float, default=1.0, help="λ of task arithmetic / TIES")
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
    parser.add_argument("--files_from", default=None,
                        help="model whose config.json / tokenizer files go into the merged folder (default: the "
                             "backbone, as the original)")
    add_evaluation_arguments(parser)


def eval_options(args: argparse.Namespace) -> EvalOptions:
    """The evaluation settings of the shared flags (names and run record are filled in by the pipeline)."""
    if args.num_threads is not None and args.num_threads < 1:
        raise SystemExit(f"--num_threads must be >= 1, got {args.num_threads}")
    return EvalOptions(
        save_dir=args.save_dir, backend=args.backend, tensor_parallel_size=args.tensor_parallel_size,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, num_threads=args.num_threads,
        seed=args.seed, max_tokens=args.max_tokens, data_dir=args.data_dir, alpaca_eval_path=args.alpaca_eval_path,
        start_index=args.start_index, end_index=args.end_index,
        code_timeout=args.code_timeout, code_memory_mb=args.code_memory_mb, code_workers=args.code_workers,
        prompt_format=args.prompt_format, answer_extraction=resolve_answer_extraction(args),
        resume=not args.restart, metric=args.metric)


def resolve_answer_extraction(args: argparse.Namespace) -> str:
    """``auto``: flexible with chat prompts (chat models rarely use the paper's phrase), else the paper's."""
    if args.answer_extraction == "auto":
        return "flexible" if args.prompt_format == "chat" else "paper"
    return args.answer_extraction


def checkpoint_settings(args: argparse.Namespace) -> CheckpointSettings:
    return CheckpointSettings(model_dir=args.model_dir, save_dtype=args.save_dtype, merge_device=args.merge_device,
                              keep_model=args.keep_model, allow_backbone_mismatch=args.allow_backbone_mismatch,
                              allow_pickle=args.allow_pickle, files_from=getattr(args, "files_from", None))


def inference_run(args: argparse.Namespace) -> InferenceRun:
    """The inference script's run; the backbone is looked up (and required) only when p > 0."""
    dare = dare_options_from_args(args)
    backbone = None
    if dare.drop_rate > 0.0:
        try:
            backbone = backbone_name(args.finetuned_model_name, pretrained=args.pretrained_model_name,
                                     llama2_backbone=args.wizardcoder_use_llama2_as_backbone)
        except ValueError as error:
            raise SystemExit(str(error)) from None
        if backbone is None:
            raise SystemExit(f"--weight_mask_rate > 0 needs the backbone of {args.finetuned_model_name}: "
                             f"pass --pretrained_model_name")
    return InferenceRun(finetuned_model_name=args.finetuned_model_name, dataset_name=args.dataset_name,
                        evaluation=eval_options(args), dare=dare, backbone_name=backbone,
                        llama2_backbone=args.wizardcoder_use_llama2_as_backbone,
                        checkpoint=checkpoint_settings(args), arguments=vars(args))


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


def _dataset_groups(args: argparse.Namespace, tasks: list[str | None]) -> DatasetGroups:
    """(task, datasets) groups to evaluate; one group when --datasets (or --evaluate_task) is given."""
    if args.evaluate_only and args.evaluate_task:
        return [(None, list(args.datasets) if args.datasets else task_datasets(args.evaluate_task))]
    if args.datasets:
        return [(None, list(args.datasets))]
    if any(task is None for task in tasks):
        raise SystemExit("pass --datasets (or --model_tasks) to choose the benchmarks of --models_to_merge")
    return [(task, task_datasets(task)) for task in tasks]


def merge_run(args: argparse.Namespace, *, child_command: list[str] | None) -> MergeRun:
    """The merge script's run. ``child_command`` re-runs the script (with the same flags) for --eval_in_child;
    it is used when asked (always) or, with auto, when the backend resolves to vLLM."""
    from utils.llm.generation import resolve_backend_kind

    names, tasks, label = merge_members(args)
    if args.evaluate_only and not Path(args.evaluate_only).is_dir():
        raise SystemExit(f"--evaluate_only: {args.evaluate_only} is not a folder")
    groups = _dataset_groups(args, tasks)
    backbone = args.pretrained_model_name
    if not args.evaluate_only and backbone is None:
        try:
            backbone = common_backbone(names)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    in_child = args.eval_in_child == "always" or (args.eval_in_child == "auto"
                                                  and resolve_backend_kind(args.backend) == "vllm")
    return MergeRun(
        models=names, tasks=tasks, label=label, groups=groups, evaluation=eval_options(args),
        method=args.merging_method_name, mask_apply_method=args.mask_apply_method,
        scaling_coefficient=args.scaling_coefficient, param_value_mask_rate=args.param_value_mask_rate,
        dare=dare_options_from_args(args), backbone_name=backbone, evaluate_only=args.evaluate_only,
        tokenizer_path=args.tokenizer_path, child_command=child_command if in_child else None,
        checkpoint=checkpoint_settings(args), arguments=vars(args))


def precheck(prog: str, args: argparse.Namespace, models: list[str | None], datasets: list[str]) -> int | None:
    """Refusals before torch loads (utils/precheck.py): every model must be a folder (itself or under
    --model_dir), a paper model name or a hub id (utils/llm/models.resolve_model); every local data file of
    the datasets must exist."""
    from utils.llm.data import DATA_FILES, _data_file
    from utils.llm.models import resolve_model
    from utils.precheck import model_source, refused

    def check() -> None:
        for name in models:
            if name is not None and not Path(resolve_model(name, getattr(args, "model_dir", None))).is_dir():
                model_source(name, "model")   # ./nope, nope/, a/b/c: neither a folder nor a hub id
        for dataset in datasets:
            if dataset in DATA_FILES:
                _data_file(dataset, DATA_FILES[dataset], args.data_dir)

    return refused(prog, check, (FileNotFoundError,))
