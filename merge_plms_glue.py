"""Merge fine-tuned GLUE task models with average / task arithmetic / Fisher / RegMean / TIES, ± DARE.

Each group of tasks (--dataset_names, or every pair of the eight tasks) is merged for every setting of
the method's grid (configs/glue.yaml, "paper" grid by default; --merge_grid none uses the flags as the
single setting). Heads (.*classifier.*) are excluded from the merge and every task is evaluated with its
own head. Settings are selected on --select_on (validation = 10% held out of GLUE train, the default;
test = GLUE dev, the original protocol) and winners are reported on the test split (GLUE dev).
mask_merging = DARE (--weight_mask_rate grid, --use_weight_rescale, --mask_strategy, --weight_format)
followed by --mask_apply_method with that method's winning hyperparameters (read from its result file).

Outputs, under --save_dir:
  save_merge_results/<tasks>/<method>[/<apply_method>]/<lm><suffix>.json        winners + all settings
  save_merge_results/<tasks>/<method>[/<apply_method>]/<lm><suffix>_settings/<setting>.json
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from model_merging_methods import MergeError
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
    task_learning_rate,
)
from utils.glue.search import (
    BASE_METHODS,
    MERGING_METHODS,
    STATISTICS_AXIS,
    MergeSearch,
    TaskMember,
    check_drop_rate,
    check_same_architecture,
    expand_grid,
    read_apply_method_winners,
    scores_of,
    select_winners,
    setting_name,
)
from utils.glue.training import encode_split, make_loader


def build_parser(config: dict) -> argparse.ArgumentParser:
    merging = config["merging"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--language_model_name", default="roberta-base", help="pretrained encoder θ_pre (hub id or folder); also names the checkpoints")
    parser.add_argument("--dataset_names", nargs="+", default=None, help="tasks whose models are merged together (default: every pair of the eight tasks)")
    parser.add_argument("--merging_method_name", default="average_merging", choices=MERGING_METHODS, help="merging method")
    parser.add_argument("--scaling_coefficient", type=float, default=1.0, help="λ of task arithmetic / TIES (grid none)")
    parser.add_argument("--nums_fisher_examples", type=int, nargs="+", default=None, help="examples for each model's Fisher (grid none)")
    parser.add_argument("--fisher_scaling_coefficients", type=float, nargs="+", default=None, help="per-model Fisher coefficients c_k (grid none; default 1/K)")
    parser.add_argument("--normalize_fisher_weight", action="store_true", help="scale each model's coefficient by 1/(‖F_k‖ + ε), normalised")
    parser.add_argument("--minimal_fisher_weight", type=float, default=merging["minimal_fisher_weight"], help="ε added to every Fisher entry and norm")
    parser.add_argument("--nums_regmean_examples", type=int, nargs="+", default=None, help="examples for each model's Gram matrices (grid none)")
    parser.add_argument("--reduce_non_diagonal_ratio", type=float, default=1.0, help="RegMean α: off-diagonal Gram entries × α (grid none)")
    parser.add_argument("--param_value_mask_rate", type=float, default=0.8, help="TIES trim fraction (keep the top 1 − r of |δ|) (grid none)")
    add_dare_arguments(parser)
    parser.add_argument("--mask_apply_method", default="average_merging", choices=BASE_METHODS, help="method applied after DARE in mask_merging")
    parser.add_argument("--merge_grid", default="paper", help="grid of configs/glue.yaml merge_grids (paper, small, ...) or none (= the flags)")
    parser.add_argument("--select_on", choices=["validation", "test"], default="validation", help="split the grid is searched on (test = the original protocol)")
    parser.add_argument("--batch_size", type=int, default=config["training"]["batch_size"], help="evaluation and statistics batch size")
    parser.add_argument("--seed", type=int, default=merging["seed"], help="seed reset before every merge (DARE masks, statistics data order)")
    parser.add_argument("--learning_rate", type=float, default=None, help="learning rate in the checkpoint names (default: the config's table)")
    parser.add_argument("--max_seq_length", type=int, default=config["training"]["max_seq_length"], help="truncation length in tokens")
    parser.add_argument("--max_train_samples", type=int, default=None, help="use only the first N train examples for statistics")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="use only the first N examples of validation and test")
    parser.add_argument("--ties_trim", default=merging["ties_trim"], choices=["global", "per_tensor"], help="TIES trim over the whole model (MergeLM GLUE) or per tensor")
    parser.add_argument("--ties_normalize", default=merging["ties_normalize"], choices=["count", "weights"], help="TIES disjoint-mean divisor")
    add_run_arguments(parser, save_dir_help="root of save_models/ (input) and save_merge_results/ (output)")
    return parser


def cli_setting(method: str, args) -> dict:
    """The single setting of ``--merge_grid none``, from the flags."""
    if method == "task_arithmetic":
        return {"scaling_coefficient": args.scaling_coefficient}
    if method == "ties_merging":
        return {"scaling_coefficient": args.scaling_coefficient, "param_value_mask_rate": args.param_value_mask_rate}
    if method == "fisher_merging":
        if args.nums_fisher_examples is None:
            raise ValueError("fisher_merging with --merge_grid none needs --nums_fisher_examples")
        setting = {"nums_fisher_examples": args.nums_fisher_examples}
        if args.fisher_scaling_coefficients is not None:
            setting["fisher_scaling_coefficients"] = args.fisher_scaling_coefficients
        return setting
    if method == "regmean_merging":
        if args.nums_regmean_examples is None:
            raise ValueError("regmean_merging with --merge_grid none needs --nums_regmean_examples")
        return {"nums_regmean_examples": args.nums_regmean_examples, "reduce_non_diagonal_ratio": args.reduce_non_diagonal_ratio}
    return {}


def result_suffix(args, for_apply_method: bool = False) -> str:
    """File-name suffix for settings that differ from the paper's defaults."""
    suffix = "" if args.merge_grid == "paper" else f"_grid_{args.merge_grid}"
    suffix += "" if args.select_on == "validation" else f"_select_on_{args.select_on}"
    if args.merging_method_name == "mask_merging" and not for_apply_method:
        suffix += "" if args.use_weight_rescale else "_rescale_False"
        suffix += "_strategy_magnitude" if args.mask_strategy == "magnitude" else ""
        suffix += "_weight_format_finetuned_weight" if args.weight_format == "finetuned_weight" else ""
    return suffix


def result_dir(args, tasks: list[str], method: str, apply_method: str | None) -> Path:
    folder = Path(args.save_dir) / "save_merge_results" / "_".join(tasks) / method
    return folder / apply_method if apply_method else folder


def grid_settings(args, config: dict, tasks: list[str], short: str) -> tuple[str, list[tuple[dict, float]]]:
    """(base method, [(base setting, DARE rate)]) to search; validates rates and grids."""
    method = args.merging_method_name
    if method == "mask_merging":
        apply = args.mask_apply_method
        if args.merge_grid == "none":
            base_settings = [cli_setting(apply, args)]
            rates = [args.weight_mask_rate]
        else:
            grid = _grid(config, args.merge_grid)
            rates = expand_grid(grid["mask_merging"], f"merge grid '{args.merge_grid}' mask_merging")
            rates = [check_drop_rate(r["weight_mask_rate"], "mask_merging weight_mask_rate") for r in rates]
            apply_file = result_dir(args, tasks, apply, None) / f"{short}{result_suffix(args, for_apply_method=True)}.json"
            base_settings = read_apply_method_winners(apply_file, apply)
        return apply, [(setting, rate) for setting in base_settings for rate in rates]
    if args.merge_grid == "none":
        return method, [(cli_setting(method, args), 0.0)]
    grid = _grid(config, args.merge_grid)
    if method not in grid:
        raise ValueError(f"merge grid '{args.merge_grid}' has no entry for {method}")
    axes = grid[method]
    settings = expand_grid(axes, f"merge grid '{args.merge_grid}' {method}") if axes else [{}]
    return method, [(setting, 0.0) for setting in settings]


def _grid(config: dict, name: str) -> dict:
    if name not in config["merge_grids"]:
        raise ValueError(f"unknown merge grid '{name}'; known: {', '.join(config['merge_grids'])}, none")
    return config["merge_grids"][name]


def load_member(task: str, row: dict, checkpoint: Path, data: dict, args, needs_train: bool) -> TaskMember:
    from transformers import AutoTokenizer

    model = load_classifier(checkpoint, allow_pickle=args.allow_pickle)
    if model.config.num_labels != row["num_labels"]:
        raise ValueError(f"checkpoint {checkpoint} has a head with {model.config.num_labels} labels but task '{task}' needs {row['num_labels']}")
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    member = TaskMember(task=task, row=row, model=model, state={k: v.detach().clone() for k, v in model.state_dict().items()})
    for split in {args.select_on, "test"}:
        member.eval_loaders[split] = make_loader(encode_split(tokenizer, data[split], row, args.max_seq_length), tokenizer, args.batch_size, shuffle=False)
    if needs_train:
        encoded = encode_split(tokenizer, data["train"], row, args.max_seq_length)
        member.train_loader = make_loader(encoded, tokenizer, args.batch_size, shuffle=True, seed=args.seed)
    return member


def run_group(args, config: dict, tasks: list[str], data: dict, checkpoints: dict, device) -> dict:
    """Search one group's grid; write the per-setting and winner JSONs; return the winner payload."""
    started = time.time()
    short = model_short_name(args.language_model_name)
    exclude = config["exclude_param_names_regex"]
    method, settings = grid_settings(args, config, tasks, short)
    needs_train = method in STATISTICS_AXIS
    members = [load_member(task, task_info(config, task), checkpoints[task], data[task], args, needs_train) for task in tasks]
    base_model = load_classifier(args.language_model_name, allow_pickle=args.allow_pickle, num_labels=members[0].row["num_labels"])
    base_state = base_model.state_dict()
    for member in members:
        if member.model.config.model_type != base_model.config.model_type:
            raise ValueError(
                f"different architectures: checkpoint {checkpoints[member.task]} is '{member.model.config.model_type}' "
                f"but {args.language_model_name} is '{base_model.config.model_type}'"
            )
        check_same_architecture(base_state, member.state, args.language_model_name, str(checkpoints[member.task]), exclude)
    search = MergeSearch(members, base_state, exclude, device, args)
    records = []
    for setting, rate in settings:
        full_setting = {**setting, **({"weight_mask_rate": rate} if args.merging_method_name == "mask_merging" else {})}
        merged = search.merge(method, setting, rate)
        metrics = search.evaluate(merged, args.select_on)
        record = {
            "name": setting_name(full_setting),
            "setting": setting,
            "weight_mask_rate": rate,
            "selection_split": args.select_on,
            "selection_metrics": metrics,
            "selection_scores": scores_of(members, metrics),
        }
        records.append(record)
        print(f"{'_'.join(tasks)} {args.merging_method_name} {record['name']}: " + ", ".join(f"{k} {v:.4f}" for k, v in record["selection_scores"].items()))
    winners = {}
    for criterion, index in select_winners(records, ["mean", *tasks]).items():
        record = records[index]
        if "test_metrics" not in record:
            test = record["selection_metrics"] if args.select_on == "test" else search.evaluate(search.merge(method, record["setting"], record["weight_mask_rate"]), "test")
            record["test_metrics"], record["test_scores"] = test, scores_of(members, test)
        winners[criterion] = {"criterion": criterion, **record}
    apply_method = args.mask_apply_method if args.merging_method_name == "mask_merging" else None
    folder = result_dir(args, tasks, args.merging_method_name, apply_method)
    stem = f"{short}{result_suffix(args)}"
    payload = {
        "script": "merge_plms_glue.py",
        "config": {**vars(args), "tasks": tasks, "base_method": method, "exclude_param_names_regex": exclude, "checkpoints": {t: str(p) for t, p in checkpoints.items()}},
        "seeds": {"merge_seed": args.seed, "split_seed": config["splits"]["split_seed"]},
        "versions": library_versions(),
        "num_examples": {task: {split: len(split_data) for split, split_data in data[task].items()} for task in tasks},
        "winners": winners,
        "settings": records,
        "wall_time_s": time.time() - started,
    }
    for record in records:
        write_json_atomic(folder / f"{stem}_settings" / f"{record['name']}.json", {"config": payload["config"], "versions": payload["versions"], **record})
    path = write_json_atomic(folder / f"{stem}.json", payload)
    best = winners["mean"]
    print(f"winner {best['name']} ({args.select_on} mean {best['selection_scores']['mean']:.4f}); test " + ", ".join(f"{k} {v:.4f}" for k, v in best["test_scores"].items()) + f" -> {path}")
    return payload


def main(argv=None) -> list[dict]:
    try:
        config = load_glue_config(config_path_from_argv(argv))
    except GlueDataError as error:
        raise SystemExit(f"error: {error}") from error
    parser = build_parser(config)
    args = parser.parse_args(argv)
    args.progress = not args.no_progress
    tasks_all = args.dataset_names or list(config["tasks"])
    for task in tasks_all:
        if task not in config["tasks"]:
            parser.error(f"unknown GLUE task '{task}'; known tasks: {', '.join(config['tasks'])}")
    if len(set(tasks_all)) != len(tasks_all) or len(tasks_all) < 2:
        parser.error(f"--dataset_names needs at least two distinct tasks, got {tasks_all}")
    if not 0.0 <= args.weight_mask_rate < 1.0:
        parser.error(f"--weight_mask_rate {args.weight_mask_rate} is outside [0, 1)")
    groups = [tasks_all] if args.dataset_names else [list(pair) for pair in itertools.combinations(tasks_all, 2)]
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    short = model_short_name(args.language_model_name)
    try:
        device = resolve_device(args.device, args.gpu)
        for group in groups:
            grid_settings(args, config, group, short)
        method = args.mask_apply_method if args.merging_method_name == "mask_merging" else args.merging_method_name
        splits = tuple({args.select_on, "test"} | ({"train"} if method in STATISTICS_AXIS else set()))
        data, checkpoints = {}, {}
        for task in tasks_all:
            data[task] = load_task_splits(task, config, args.glue_dir, splits=splits, max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples)
            checkpoints[task] = Path(args.save_dir) / "save_models" / task / checkpoint_name(short, task_learning_rate(config, short, task, args.learning_rate))
            if not checkpoints[task].is_dir():
                raise FileNotFoundError(f"checkpoint of task '{task}' not found: {checkpoints[task]} (train it with train_plms_glue.py)")
        return [run_group(args, config, group, data, checkpoints, device) for group in groups]
    except (GlueDataError, MergeError, ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main()
