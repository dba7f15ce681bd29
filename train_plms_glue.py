"""Fine-tune an encoder (BERT, RoBERTa, any HF encoder) on one GLUE task, or on two tasks jointly.

Outputs (under --save_dir, folder names as the original MergeLM):
  save_models/<task>/<lm>_lr<lr>[_run<r>]/            best checkpoint (safetensors) + tokenizer
  save_model_results/<task>/<name>/<name>.json        resolved config, seeds, versions, history, metrics
Multitask mode uses the folder <auxiliary>_<target> and saves the encoder plus one head per task.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from safetensors.torch import save_file

from utils.glue.data import GlueDataError, load_glue_config, load_task_splits, task_info
from utils.records import library_versions, write_json_atomic
from utils.glue.checkpoints import (
    add_run_arguments,
    HelpFormatter,
    checkpoint_name,
    config_path_from_argv,
    load_classifier,
    model_short_name,
    resolve_device,
    save_folder_atomic,
    save_pretrained_safetensors,
    set_random_seed,
    task_learning_rate,
)
from utils.glue.training import (
    MultiTaskModel,
    TrainingSettings,
    encode_split,
    evaluate_task,
    make_loader,
    train_model,
)
from torch.utils.data import ConcatDataset


def build_parser(config: dict) -> argparse.ArgumentParser:
    training = config["training"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset_name", default="cola", help="target GLUE task: " + ", ".join(config["tasks"]))
    parser.add_argument("--auxiliary_dataset_name", default="cola", help="second task in --multitask_training mode (must differ from --dataset_name)")
    parser.add_argument("--language_model_name", default="roberta-base", help="hub id or local folder of the pretrained encoder")
    parser.add_argument("--multitask_training", action="store_true", help="train one shared encoder with a head per task on both tasks")
    parser.add_argument("--batch_size", type=int, default=training["batch_size"], help="train and evaluation batch size")
    parser.add_argument("--num_epochs", type=int, default=training["num_epochs"], help="training epochs")
    parser.add_argument("--learning_rate", type=float, default=None, help="peak learning rate (default: the config's table for this model and task)")
    parser.add_argument("--num_runs", type=int, default=training["num_runs"], help="independent runs; run r uses seed + r and folder suffix _run<r> (r >= 1)")
    parser.add_argument("--seed", type=int, default=training["seed"], help="seed of run 0 (head init, data order, dropout)")
    parser.add_argument("--max_seq_length", type=int, default=training["max_seq_length"], help="truncation length in tokens")
    parser.add_argument("--max_train_samples", type=int, default=None, help="use only the first N examples of the train split")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="use only the first N examples of validation and test")
    parser.add_argument("--group_by_length", action="store_true", help="batch train examples of similar length (HF Trainer option; faster on CPU; off in the paper)")
    parser.add_argument("--overwrite", action="store_true", help="retrain even if the checkpoint exists (default: evaluate the existing one)")
    add_run_arguments(parser, save_dir_help="root of save_models/ and save_model_results/")
    return parser


def check_args(args, config: dict, parser: argparse.ArgumentParser) -> list[str]:
    """The task list (target last); bad values -> parser.error (exit 2) before anything is written."""
    for name in ("batch_size", "num_epochs", "num_runs", "max_seq_length"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.learning_rate is not None and args.learning_rate <= 0:
        parser.error(f"--learning_rate must be positive, got {args.learning_rate}")
    tasks = [args.auxiliary_dataset_name, args.dataset_name] if args.multitask_training else [args.dataset_name]
    for task in tasks:
        if task not in config["tasks"]:
            parser.error(f"unknown GLUE task '{task}'; known tasks: {', '.join(config['tasks'])}")
    if args.multitask_training and args.auxiliary_dataset_name == args.dataset_name:
        parser.error(f"--multitask_training needs --auxiliary_dataset_name different from --dataset_name ({args.dataset_name})")
    return tasks


def build_model(args, rows: dict[str, dict]):
    if args.multitask_training:
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(args.language_model_name, use_safetensors=None if args.allow_pickle else True)
        return MultiTaskModel(encoder, rows)
    (row,) = rows.values()
    return load_classifier(args.language_model_name, allow_pickle=args.allow_pickle, num_labels=row["num_labels"])


def save_checkpoint(model, tokenizer, rows: dict[str, dict], target: Path) -> None:
    def write(folder: Path) -> None:
        if isinstance(model, MultiTaskModel):
            save_pretrained_safetensors(model.encoder, folder)
            heads = {f"{task}.{name}": tensor.detach().cpu().contiguous() for task, head in model.heads.items() for name, tensor in head.state_dict().items()}
            save_file(heads, str(folder / "multitask_heads.safetensors"))
            write_json_atomic(folder / "multitask_config.json", {"tasks": rows})
        else:
            save_pretrained_safetensors(model, folder)
        tokenizer.save_pretrained(folder)

    save_folder_atomic(target, write)


def run_once(args, config, tasks, data, tokenizer, device, run: int) -> dict:
    """Train (or reuse) one run and write its checkpoint and result JSON; returns the result."""
    short = model_short_name(args.language_model_name)
    rows = {task: task_info(config, task) for task in tasks}
    learning_rate = task_learning_rate(config, short, args.dataset_name, args.learning_rate)
    name = checkpoint_name(short, learning_rate, run)
    folder_task = "_".join(tasks)
    save_root = Path(args.save_dir)
    model_dir = save_root / "save_models" / folder_task / name
    result_path = save_root / "save_model_results" / folder_task / name / f"{name}.json"
    seed = args.seed + run
    set_random_seed(seed)
    encoded = {task: {split: encode_split(tokenizer, data[task][split], rows[task], args.max_seq_length) for split in data[task]} for task in tasks}
    train_set = ConcatDataset([encoded[task]["train"] for task in tasks]) if len(tasks) > 1 else encoded[tasks[0]]["train"]
    train_loader = make_loader(train_set, tokenizer, args.batch_size, shuffle=True, seed=seed, group_by_length=args.group_by_length)
    eval_loaders = {split: {task: make_loader(encoded[task][split], tokenizer, args.batch_size, shuffle=False) for task in tasks} for split in ("validation", "test")}
    started = time.time()
    reused = model_dir.is_dir() and (model_dir / "training_state.json").is_file() and not args.overwrite
    if reused:
        model = load_trained(model_dir, args, rows)
        training = {"reused_checkpoint": str(model_dir)}
    else:
        model = build_model(args, rows)
        settings = TrainingSettings(
            learning_rate=learning_rate,
            num_epochs=args.num_epochs,
            **{key: config["training"][key] for key in ("warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm")},
            progress=not args.no_progress,
        )
        training = train_model(model, train_loader, eval_loaders["validation"], rows, settings, device)
    model.to(device)
    test = {task: evaluate_task(model, loader, rows[task], device, progress=not args.no_progress, description=f"test {task}") for task, loader in eval_loaders["test"].items()}
    validation = {task: evaluate_task(model, loader, rows[task], device) for task, loader in eval_loaders["validation"].items()}
    result = {
        "script": "train_plms_glue.py",
        "config": {**vars(args), "learning_rate": learning_rate, "run": run, "tasks": tasks},
        "seeds": {"run_seed": seed, "split_seed": config["splits"]["split_seed"]},
        "versions": library_versions(),
        "num_examples": {task: {split: len(data[task][split]) for split in data[task]} for task in tasks},
        "training": training,
        "validation_metrics": validation,
        "test_metrics": test,
        "wall_time_s": time.time() - started,
        "checkpoint": str(model_dir),
    }
    if not reused:
        save_checkpoint(model, tokenizer, rows, model_dir)
        write_json_atomic(model_dir / "training_state.json", {"best_epoch": training["best_epoch"], "history": training["history"]})
    write_json_atomic(result_path, result)
    return result


def load_trained(model_dir: Path, args, rows: dict[str, dict]):
    """A checkpoint written by this script (single-task classifier or multitask encoder + heads)."""
    if (model_dir / "multitask_heads.safetensors").is_file():
        from safetensors.torch import load_file
        from transformers import AutoModel

        model = MultiTaskModel(AutoModel.from_pretrained(str(model_dir), use_safetensors=True), rows)
        heads = load_file(str(model_dir / "multitask_heads.safetensors"))
        for task, head in model.heads.items():
            head.load_state_dict({name: heads[f"{task}.{name}"] for name in head.state_dict()})
        return model
    return load_classifier(model_dir)


def main(argv=None) -> list[dict]:
    try:
        config = load_glue_config(config_path_from_argv(argv))
    except GlueDataError as error:
        raise SystemExit(f"error: {error}") from error
    parser = build_parser(config)
    args = parser.parse_args(argv)
    tasks = check_args(args, config, parser)
    args.progress = not args.no_progress
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        device = resolve_device(args.device, args.gpu)
        data = {task: load_task_splits(task, config, args.glue_dir, max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples) for task in tasks}
        tokenizer = AutoTokenizer.from_pretrained(args.language_model_name)
        results = []
        for run in range(args.num_runs):
            result = run_once(args, config, tasks, data, tokenizer, device, run)
            print(f"run {run}: test " + ", ".join(f"{task}: {m}" for task, m in result["test_metrics"].items()))
            results.append(result)
    except (GlueDataError, ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from error
    return results


if __name__ == "__main__":
    main()
