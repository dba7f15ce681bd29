"""Fine-tune an encoder (BERT, RoBERTa, any HF encoder) on one GLUE task, or on two tasks jointly.

Outputs (under --save_dir, folder names as the original MergeLM):
  save_models/<task>/<lm>_lr<lr>[_run<r>]/            best checkpoint (safetensors) + tokenizer
  save_model_results/<task>/<name>/<name>.json        resolved config, seeds, versions, history, metrics
Multitask mode uses the folder <auxiliary>_<target> and saves the encoder plus one head per task.
Training is transformers' Trainer with the original's TrainingArguments (torchrun / accelerate launch work).
An existing checkpoint folder is evaluated, not retrained, when this script (training_state.json) or the
original code (trainer_state.json) wrote it; any other existing folder is refused (exit 2) unless --overwrite.
"""
from __future__ import annotations

import argparse

from utils.cli import HelpFormatter, resolve_device
from utils.glue.cli import add_run_arguments, check_tasks, config_from_argv, precheck, user_errors


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
    parser.add_argument("--max_validation_samples", type=int, default=None,
                        help="use only the first N examples of validation, the split the best epoch is chosen on (overrides --max_eval_samples there)")
    parser.add_argument("--group_by_length", action="store_true", help="batch train examples of similar length (HF Trainer option; faster on CPU; off in the paper)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="Trainer mixed precision (fp32 = the paper)")
    parser.add_argument("--report_to", nargs="*", default=[], help="Trainer logging integrations (tensorboard, wandb, ...; default none)")
    parser.add_argument("--overwrite", action="store_true",
                        help="retrain and replace an existing checkpoint folder (default: evaluate one this script or the original "
                             "code wrote, refuse any other folder)")
    add_run_arguments(parser, save_dir_help="root of save_models/ and save_model_results/")
    return parser


def check_args(args, config: dict, parser: argparse.ArgumentParser) -> list[str]:
    """The task list (target last); bad values -> parser.error (exit 2) before anything is written."""
    for name in ("batch_size", "num_epochs", "num_runs", "max_seq_length", "max_validation_samples"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.learning_rate is not None and args.learning_rate <= 0:
        parser.error(f"--learning_rate must be positive, got {args.learning_rate}")
    tasks = [args.auxiliary_dataset_name, args.dataset_name] if args.multitask_training else [args.dataset_name]
    check_tasks(parser, config, tasks)
    if args.multitask_training and args.auxiliary_dataset_name == args.dataset_name:
        parser.error(f"--multitask_training needs --auxiliary_dataset_name different from --dataset_name ({args.dataset_name})")
    return tasks


def options_from_args(args: argparse.Namespace, tasks: list[str]) -> TrainOptions:
    from utils.glue.training import TrainOptions  # torch loads only after parsing (fast --help)

    return TrainOptions(
        language_model_name=args.language_model_name, tasks=tuple(tasks), multitask=args.multitask_training,
        learning_rate=args.learning_rate, batch_size=args.batch_size, num_epochs=args.num_epochs, num_runs=args.num_runs,
        seed=args.seed, max_seq_length=args.max_seq_length, group_by_length=args.group_by_length, overwrite=args.overwrite,
        allow_pickle=args.allow_pickle, glue_dir=args.glue_dir, max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples, max_validation_samples=args.max_validation_samples, save_dir=args.save_dir, progress=not args.no_progress,
        flags={**vars(args), "progress": not args.no_progress}, precision=args.precision, report_to=tuple(args.report_to),
    )


def main(argv=None) -> list[dict]:
    config = config_from_argv(argv)
    parser = build_parser(config)
    args = parser.parse_args(argv)
    tasks = check_args(args, config, parser)
    precheck("train_plms_glue.py", args, config)   # before torch loads
    with user_errors():
        from utils.glue.training import run_training

        return run_training(options_from_args(args, tasks), config, resolve_device(args.device, args.gpu))


if __name__ == "__main__":
    main()
