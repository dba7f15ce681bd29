"""Evaluating fine-tuned GLUE checkpoints, optionally after DARE / DropOnly / magnitude pruning (the paper's
single-model drop experiments, run by inference_plms_glue.py).

With a drop rate p > 0 every non-head parameter is replaced by
  delta_weight:     θ' = θ_pre + M(θ_ft − θ_pre)      finetuned_weight:  θ' = M(θ_ft)
where M drops entries (random: Bernoulli(p) per entry; magnitude: the int(n·p) smallest |x| per tensor)
and, with rescaling, divides the kept ones by (1 − p) (model_merging_methods.dare_state_dict). Heads
(the config's exclude regex) are left untouched. Masks are seeded by the run's seed.

Several (rate, seed) settings of one variant can be evaluated from one load of each task's checkpoint and
of the base (``batch_rates`` / ``batch_seeds``; utils/glue/dropping.py): each setting writes the result
file, with the config, that a call with that single rate and seed writes, and the same metrics.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from model_merging_methods import DareOptions
from utils.cli import dare_suffix
from utils.glue.checkpoints import check_head, load_classifier, model_result_path, task_checkpoint
from utils.glue.data import load_task_splits, task_info
from utils.glue.dropping import DropSetting, drop_settings, evaluate_drop_settings
from utils.glue.search import check_same_architecture
from utils.glue.training import encode_split, evaluate_task, make_loader
from utils import progress
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
    batch_rates: tuple[float, ...] | None = None  # several drop rates from one load (replace dare.drop_rate)
    batch_seeds: tuple[int, ...] | None = None  # several mask seeds from one load (replace seed)
    batch_flags: tuple[str, ...] = ()  # names of the list flags in ``flags``, recorded as None per setting

    def settings(self) -> list[DropSetting]:
        rates = list(self.batch_rates) if self.batch_rates else [self.dare.drop_rate]
        seeds = list(self.batch_seeds) if self.batch_seeds else [self.seed]
        return drop_settings(rates, seeds, self.dare.rescale, self.dare.strategy, self.dare.weight_format)


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
    settings = options.settings()
    outputs = []
    evaluations = iter(range(len(jobs) * len(settings)))   # the call's parts, for its progress and ETA
    for task, row, data, checkpoint in jobs:
        started = time.time()
        model = load_classifier(checkpoint, allow_pickle=options.allow_pickle)
        base = None
        if any(setting.options.drop_rate > 0.0 for setting in settings):
            base = load_classifier(options.language_model_name, allow_pickle=options.allow_pickle, num_labels=row["num_labels"]).state_dict()
            check_same_architecture(base, model.state_dict(), options.language_model_name, str(checkpoint), exclude)
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        loaders = {split: make_loader(encode_split(tokenizer, data[split], row, options.max_seq_length), tokenizer, options.batch_size, shuffle=False)
                   for split in options.eval_splits}
        model.to(device)
        load_seconds = time.time() - started

        def evaluate(dropped) -> dict:
            progress.phase(next(evaluations), len(jobs) * len(settings), task)
            return {split: evaluate_task(dropped, loader, row, device, progress=options.progress, description=f"{split} {task}")
                    for split, loader in loaders.items()}

        started = time.time()
        for setting, metrics in evaluate_drop_settings(model, base, settings, evaluate, exclude):
            name = result_name(checkpoint.name, setting.options, setting.seed)
            flags = {**options.flags, "weight_mask_rate": setting.options.drop_rate, "seed": setting.seed,
                     **{flag: None for flag in options.batch_flags}}
            payload = {
                "script": "inference_plms_glue.py",
                "config": {**flags, "task": task, "checkpoint": str(checkpoint), "exclude_param_names_regex": exclude},
                "seeds": {"mask_seed": setting.seed, "split_seed": config["splits"]["split_seed"]},
                "versions": library_versions(),
                "num_examples": {split: len(data[split]) for split in options.eval_splits},
                "metrics": metrics,
                "wall_time_s": time.time() - started + (load_seconds if len(settings) == 1 else 0.0),
            }
            if len(settings) > 1:
                payload["batch"] = {"settings": len(settings), "load_seconds": load_seconds}
            path = write_json_atomic(model_result_path(options.save_dir, [task], name), payload)
            print(f"{task} {name}: " + "; ".join(f"{split} {m}" for split, m in metrics.items()) + f" -> {path}")
            outputs.append(payload)
            started = time.time()
    return outputs
