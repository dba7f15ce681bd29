"""Evaluate fine-tuned GLUE checkpoints, optionally after DARE / DropOnly / magnitude pruning.

For each task: load save_models/<task>/<lm>_lr<lr> (lr from the config's table unless --learning_rate),
and if --weight_mask_rate p > 0 replace every non-head parameter by (docs/mergelm-spec.md §4.6)
  delta_weight:     θ' = θ_pre + M(θ_ft − θ_pre)      finetuned_weight:  θ' = M(θ_ft)
where M drops entries (random: Bernoulli(p) per entry; magnitude: the int(n·p) smallest |x| per tensor)
and, with --use_weight_rescale, divides the kept ones by (1 − p). DARE = random + rescale; DropOnly =
random without rescale. Heads (regex .*classifier.*) are left untouched. Masks are seeded by --seed.
Writes save_model_results/<task>/<name>/<name>.json, with the original's name:
  <lm>_lr<lr>_inference_mask_<p>[_rescale_<bool>][_strategy_magnitude][_weight_format_finetuned_weight][_seed<s>]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from model_merging_methods import DareOptions, MergeError, dare_state_dict
from utils.glue.data import GlueDataError, load_glue_config, load_task_splits, task_info
from utils.records import library_versions, write_json_atomic
from utils.glue.checkpoints import (
    add_dare_arguments, add_run_arguments,
    HelpFormatter,
    checkpoint_name,
    config_path_from_argv,
    load_classifier,
    model_short_name,
    resolve_device,
    set_random_seed,
    task_learning_rate,
)
from utils.glue.search import check_same_architecture
from utils.glue.training import encode_split, evaluate_task, make_loader


def build_parser(config: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--language_model_name", default="roberta-base", help="pretrained encoder (hub id or folder): θ_pre and the checkpoint folder name")
    parser.add_argument("--dataset_names", nargs="+", default=list(config["tasks"]), help="tasks to evaluate")
    parser.add_argument("--batch_size", type=int, default=config["training"]["batch_size"], help="evaluation batch size")
    add_dare_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the DARE masks")
    parser.add_argument("--learning_rate", type=float, default=None, help="learning rate in the checkpoint name (default: the config's table)")
    parser.add_argument("--eval_splits", nargs="+", choices=["validation", "test"], default=["test"], help="splits to evaluate (test = GLUE dev)")
    parser.add_argument("--max_seq_length", type=int, default=config["training"]["max_seq_length"], help="truncation length in tokens")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="use only the first N examples of each evaluated split")
    add_run_arguments(parser, save_dir_help="root of save_models/ (input) and save_model_results/ (output)")
    return parser


def setting_suffix(args) -> str:
    """The original's result-name suffix for the masking flags (plus the seed when it is not 0)."""
    if args.weight_mask_rate == 0.0:
        suffix = "_inference_mask_0.0"
    else:
        suffix = f"_inference_mask_{args.weight_mask_rate}_rescale_{bool(args.use_weight_rescale)}"
        if args.mask_strategy == "magnitude":
            suffix += "_strategy_magnitude"
        if args.weight_format == "finetuned_weight":
            suffix += "_weight_format_finetuned_weight"
    return suffix + (f"_seed{args.seed}" if args.seed != 0 else "")


def check_head(model_config, checkpoint: Path, task: str, row: dict) -> None:
    """The checkpoint's head must have the task's number of labels."""
    if model_config.num_labels != row["num_labels"]:
        raise ValueError(
            f"checkpoint {checkpoint} has a head with {model_config.num_labels} labels but task '{task}' needs {row['num_labels']}"
        )


def main(argv=None) -> list[dict]:
    try:
        config = load_glue_config(config_path_from_argv(argv))
    except GlueDataError as error:
        raise SystemExit(f"error: {error}") from error
    parser = build_parser(config)
    args = parser.parse_args(argv)
    if not 0.0 <= args.weight_mask_rate < 1.0:
        parser.error(f"--weight_mask_rate {args.weight_mask_rate} is outside [0, 1)")
    for task in args.dataset_names:
        if task not in config["tasks"]:
            parser.error(f"unknown GLUE task '{task}'; known tasks: {', '.join(config['tasks'])}")
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    short = model_short_name(args.language_model_name)
    exclude = config["exclude_param_names_regex"]
    try:
        device = resolve_device(args.device, args.gpu)
        jobs = []
        for task in args.dataset_names:
            row = task_info(config, task)
            data = load_task_splits(task, config, args.glue_dir, splits=tuple(args.eval_splits), max_eval_samples=args.max_eval_samples)
            name = checkpoint_name(short, task_learning_rate(config, short, task, args.learning_rate))
            checkpoint = Path(args.save_dir) / "save_models" / task / name
            if not checkpoint.is_dir():
                raise FileNotFoundError(f"checkpoint of task '{task}' not found: {checkpoint} (train it with train_plms_glue.py)")
            check_head(AutoConfig.from_pretrained(str(checkpoint)), checkpoint, task, row)
            jobs.append((task, row, data, name, checkpoint))
        outputs = []
        for task, row, data, name, checkpoint in jobs:
            started = time.time()
            model = load_classifier(checkpoint, allow_pickle=args.allow_pickle)
            if args.weight_mask_rate > 0.0:
                base = load_classifier(args.language_model_name, allow_pickle=args.allow_pickle, num_labels=row["num_labels"]).state_dict()
                check_same_architecture(base, model.state_dict(), args.language_model_name, str(checkpoint), exclude)
                options = DareOptions(args.weight_mask_rate, bool(args.use_weight_rescale), args.mask_strategy, args.weight_format)
                set_random_seed(args.seed)
                model.load_state_dict(dare_state_dict(model.state_dict(), base, options, seed=args.seed, model_index=0, exclude_regex=exclude))
            tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
            metrics = {}
            for split in args.eval_splits:
                loader = make_loader(encode_split(tokenizer, data[split], row, args.max_seq_length), tokenizer, args.batch_size, shuffle=False)
                metrics[split] = evaluate_task(model.to(device), loader, row, device, progress=not args.no_progress, description=f"{split} {task}")
            result_name = name + setting_suffix(args)
            payload = {
                "script": "inference_plms_glue.py",
                "config": {**vars(args), "task": task, "checkpoint": str(checkpoint), "exclude_param_names_regex": exclude},
                "seeds": {"mask_seed": args.seed, "split_seed": config["splits"]["split_seed"]},
                "versions": library_versions(),
                "num_examples": {split: len(data[split]) for split in args.eval_splits},
                "metrics": metrics,
                "wall_time_s": time.time() - started,
            }
            path = write_json_atomic(Path(args.save_dir) / "save_model_results" / task / result_name / f"{result_name}.json", payload)
            print(f"{task} {result_name}: " + "; ".join(f"{split} {m}" for split, m in metrics.items()) + f" -> {path}")
            outputs.append(payload)
    except (GlueDataError, MergeError, ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from error
    return outputs


if __name__ == "__main__":
    main()
