"""Evaluating fine-tuned GLUE checkpoints, optionally after DARE / DropOnly / magnitude pruning (the paper's
single-model drop experiments, run by inference_plms_glue.py).

With a drop rate p > 0 every non-head parameter is replaced by
  delta_weight:     θ' = θ_pre + M(θ_ft − θ_pre)      finetuned_weight:  θ' = M(θ_ft)
where M drops entries (random: Bernoulli(p) per entry; magnitude: the int(n·p) smallest |x| per tensor)
and, with rescaling, divides the kept ones by (1 − p) (model_merging_methods.dare_state_dict). Heads
(the config's exclude regex) are left untouched. Masks are seeded by the run's seed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from model_merging_methods import DareOptions, dare_state_dict
from utils.cli import dare_suffix, set_random_seed
from utils.glue.checkpoints import check_head, load_classifier, model_result_path, task_checkpoint
from utils.glue.data import load_task_splits, task_info
from utils.glue.search import check_same_architecture
from utils.glue.training import encode_split, evaluate_task, make_loader
from utils.records import library_versions, write_json_atomic


@dataclass(frozen=True)
class InferenceOptions:
    """One drop experiment over several tasks; ``flags`` is the command line, recorded in every result."""

    language_model_name: str
    tasks: tuple[str, ...]
    dare: DareOptions
    seed: int
    eval_splits: tuple[str, ...]
    learning_rate: float | None
    batch_size: int
    max_seq_length: int
    max_eval_samples: int | None
    glue_dir: str | None
    save_dir: str
    allow_pickle: bool
    progress: bool
    flags: dict


def result_name(checkpoint: str, dare: DareOptions, seed: int) -> str:
    """The original's name: ``<checkpoint>_inference_mask_<p>[_rescale_<bool>][_strategy_magnitude]
    [_weight_format_finetuned_weight]``, plus ``_seed<s>`` when the mask seed is not 0."""
    return f"{checkpoint}_inference{dare_suffix(dare)}" + (f"_seed{seed}" if seed != 0 else "")


def run_inference(options: InferenceOptions, config: dict, device) -> list[dict]:
    """Evaluate every task's checkpoint (all are checked before any is evaluated); write one JSON each."""
    from transformers import AutoConfig, AutoTokenizer

    exclude = config["exclude_param_names_regex"]
    jobs = []
    for task in options.tasks:
        row = task_info(config, task)
        data = load_task_splits(task, config, options.glue_dir, splits=options.eval_splits, max_eval_samples=options.max_eval_samples)
        checkpoint = task_checkpoint(options.save_dir, config, options.language_model_name, task, options.learning_rate)
        check_head(AutoConfig.from_pretrained(str(checkpoint)), checkpoint, task, row)
        jobs.append((task, row, data, checkpoint))
    outputs = []
    for task, row, data, checkpoint in jobs:
        started = time.time()
        model = load_classifier(checkpoint, allow_pickle=options.allow_pickle)
        if options.dare.drop_rate > 0.0:
            base = load_classifier(options.language_model_name, allow_pickle=options.allow_pickle, num_labels=row["num_labels"]).state_dict()
            check_same_architecture(base, model.state_dict(), options.language_model_name, str(checkpoint), exclude)
            set_random_seed(options.seed)
            model.load_state_dict(dare_state_dict(model.state_dict(), base, options.dare, seed=options.seed, model_index=0, exclude_regex=exclude))
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        metrics = {}
        for split in options.eval_splits:
            loader = make_loader(encode_split(tokenizer, data[split], row, options.max_seq_length), tokenizer, options.batch_size, shuffle=False)
            metrics[split] = evaluate_task(model.to(device), loader, row, device, progress=options.progress, description=f"{split} {task}")
        name = result_name(checkpoint.name, options.dare, options.seed)
        payload = {
            "script": "inference_plms_glue.py",
            "config": {**options.flags, "task": task, "checkpoint": str(checkpoint), "exclude_param_names_regex": exclude},
            "seeds": {"mask_seed": options.seed, "split_seed": config["splits"]["split_seed"]},
            "versions": library_versions(),
            "num_examples": {split: len(data[split]) for split in options.eval_splits},
            "metrics": metrics,
            "wall_time_s": time.time() - started,
        }
        path = write_json_atomic(model_result_path(options.save_dir, [task], name), payload)
        print(f"{task} {name}: " + "; ".join(f"{split} {m}" for split, m in metrics.items()) + f" -> {path}")
        outputs.append(payload)
    return outputs
