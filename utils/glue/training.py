"""Tokenisation, models, losses, evaluation, and the training runs of train_plms_glue.py (checkpoint +
result JSON per run) for GLUE, trained with transformers' ``Trainer`` as the original MergeLM.

Losses (as the original MergeLM):
  single task: cross-entropy on the logits when the head has more than one output, else MSE between the
  squeezed logit and the score (STS-B);
  multitask: for each task present in the batch, that task's loss on its rows (CE on the task's first
  ``num_labels`` logit columns, or MSE on column 0 for STS-B); the per-task losses are SUMMED.
Optimisation: the original's ``TrainingArguments`` (configs/glue.yaml "training"): learning rate from the
table, linear warm-up over ceil(0.06 · T) steps then linear decay to 0, weight decay 0.01 (not on biases and
LayerNorm weights), AdamW (β = 0.9, 0.999, ε = 1e-8; transformers 5 has only torch's AdamW, ``adamw_torch``,
where the original's 4.33 used its own ``adamw_hf``: the same update up to where ε enters), gradient norm
clipped at 1.0, evaluation and checkpointing each epoch on the validation split, and the best epoch
(``load_best_model_at_end``; ``metric_for_best_model`` = the mean over the tasks of their main validation
score, strictly higher wins) restored at the end. ``group_by_length`` is the Trainer's length-grouped sampler.
The Trainer's epoch checkpoints go to a working folder next to the checkpoint that the run removes when
it ends; the project's checkpoint folder holds the best model only (safetensors).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from tqdm.auto import tqdm

from utils import progress as sweep_progress
from utils.cli import set_random_seed
from utils.glue.checkpoints import (checkpoint_dir, checkpoint_name, load_classifier, model_result_path, model_short_name,
                                    save_pretrained_safetensors, task_learning_rate)
from utils.glue.data import load_task_splits, task_info
from utils.glue.metrics import main_score, task_metrics
from utils.records import (check_output_folder, library_versions, remove_stale_staging, write_folder_atomic,
                           write_json_atomic)

HEAD_PADDING_VALUE = -1000.0


class EncodedSplit(Dataset):
    """Tokenised examples of one split of one task (no padding; padding happens per batch)."""

    def __init__(self, features: list[dict], labels: np.ndarray, dataset_id: int, task: str):
        self.features, self.labels, self.dataset_id, self.task = features, labels, dataset_id, task

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return {**self.features[index], "labels": self.labels[index], "dataset_ids": self.dataset_id}


def encode_split(tokenizer, split, task_row: dict, max_seq_length: int) -> EncodedSplit:
    """Tokenise (text_a[, text_b]) with truncation to ``max_seq_length`` tokens."""
    if split.text_b is None:
        encoded = tokenizer(split.text_a, truncation=True, max_length=max_seq_length)
    else:
        encoded = tokenizer(split.text_a, split.text_b, truncation=True, max_length=max_seq_length)
    keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
    features = [{key: encoded[key][i] for key in keys} for i in range(len(split))]
    return EncodedSplit(features, split.labels, task_row["dataset_id"], split.task)


def make_collator(tokenizer):
    """Pad a list of examples to the longest one in the batch; labels/dataset_ids become tensors."""

    def collate(examples: list[dict]) -> dict:
        features = [{k: v for k, v in example.items() if k not in ("labels", "dataset_ids")} for example in examples]
        batch = dict(tokenizer.pad(features, padding=True, return_tensors="pt"))
        labels = np.asarray([example["labels"] for example in examples])
        batch["labels"] = torch.as_tensor(labels, dtype=torch.float32 if labels.dtype.kind == "f" else torch.long)
        batch["dataset_ids"] = torch.as_tensor([example["dataset_ids"] for example in examples], dtype=torch.long)
        return batch

    return collate


def length_sorted_batches(dataset: Dataset, batch_size: int) -> list[list[int]]:
    """Batches of indices in order of decreasing token length (less padding; for evaluation only,
    where the metrics do not depend on the order of the examples)."""
    lengths = _lengths(dataset)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _lengths(dataset: Dataset) -> list[int]:
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    return [len(item["input_ids"]) for part in parts for item in part.features]


def make_loader(dataset: Dataset, tokenizer, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """DataLoader with dynamic padding (training itself uses the Trainer's loaders).

    shuffle=True (statistics): random order from a torch Generator seeded with ``seed``, the same order
    for every loader made with the same seed.
    shuffle=False (evaluation): batches of similar length (``length_sorted_batches``).
    """
    collate = make_collator(tokenizer)
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate)
    return DataLoader(dataset, batch_sampler=length_sorted_batches(dataset, batch_size), collate_fn=collate)


class MultiTaskModel(nn.Module):
    """Shared encoder (``AutoModel`` with pooler) and one ``nn.Linear(hidden, num_labels)`` head per task.

    Each example goes through the head of its task (``dataset_ids``) on the encoder's ``pooler_output``;
    narrower heads' outputs are right-padded with -1000 to the widest head (as the original).
    """

    def __init__(self, encoder: nn.Module, tasks: dict[str, dict]):
        super().__init__()
        self.encoder = encoder
        self.task_rows = tasks
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({task: nn.Linear(hidden, row["num_labels"]) for task, row in tasks.items()})

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, dataset_ids=None) -> torch.Tensor:
        pooled = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).pooler_output
        width = max(row["num_labels"] for row in self.task_rows.values())
        logits = pooled.new_full((pooled.shape[0], width), HEAD_PADDING_VALUE)
        for task, row in self.task_rows.items():
            rows = dataset_ids == row["dataset_id"]
            if rows.any():
                logits[rows, : row["num_labels"]] = self.heads[task](pooled[rows])
        return logits


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits of a sequence-classification model or a ``MultiTaskModel`` for a collated batch."""
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    if isinstance(model, MultiTaskModel):
        return model(**inputs, dataset_ids=batch["dataset_ids"])
    return model(**inputs).logits


def task_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Cross-entropy on the first ``num_labels`` columns, or MSE on column 0 when num_labels == 1."""
    if num_labels == 1:
        return F.mse_loss(logits[:, 0], labels.float())
    return F.cross_entropy(logits[:, :num_labels], labels.long())


def batch_loss(logits: torch.Tensor, batch: dict, tasks: dict[str, dict]) -> torch.Tensor:
    """Single task: that task's loss. Several tasks: the SUM of per-task losses over the tasks present."""
    if len(tasks) == 1:
        return task_loss(logits, batch["labels"], next(iter(tasks.values()))["num_labels"])
    total = logits.new_zeros(())
    for row in tasks.values():
        rows = batch["dataset_ids"] == row["dataset_id"]
        if rows.any():
            total = total + task_loss(logits[rows], batch["labels"][rows], row["num_labels"])
    return total


def to_device(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device, *, progress: bool = False, description: str = "eval"):
    """Concatenated logits and labels of a loader, model in eval mode."""
    model.eval()
    all_logits, all_labels = [], []
    for batch in sweep_progress.track(tqdm(loader, desc=description, disable=not progress, leave=False), description,
                                      total=len(loader), unit="batch"):
        batch = to_device(batch, device)
        all_logits.append(model_logits(model, batch).float().cpu())
        all_labels.append(batch["labels"].cpu())
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy()


def evaluate_task(model: nn.Module, loader: DataLoader, task_row: dict, device, *, progress: bool = False, description: str = "eval") -> dict:
    """``{"loss": mean loss, <metrics>...}`` of one task's split."""
    logits, labels = predict(model, loader, device, progress=progress, description=description)
    loss = task_loss(torch.from_numpy(logits), torch.from_numpy(labels), task_row["num_labels"]).item()
    return {"loss": loss, **task_metrics(task_row, logits, labels)}


def make_trainer_class():
    """``Trainer`` with MergeLM's losses (``batch_loss``) and a per-task validation: each task's split is
    evaluated with its own metrics (``eval_<task>_<metric>``) and ``eval_main_score`` = the mean over the
    tasks of their main scores is what ``metric_for_best_model`` selects on."""
    from transformers import Trainer

    class _GlueTrainer(Trainer):
        def __init__(self, *args, task_rows: dict[str, dict], validation_sets: dict[str, Dataset], **kwargs):
            super().__init__(*args, **kwargs)
            self.task_rows, self.validation_sets = task_rows, validation_sets

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model_logits(model, inputs)
            loss = batch_loss(logits, inputs, self.task_rows)
            return (loss, {"logits": logits}) if return_outputs else loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
            metrics, scores = {}, []
            for task, dataset in self.validation_sets.items():
                row = self.task_rows[task]
                self.compute_metrics = lambda prediction, row=row: task_metrics(row, prediction.predictions, prediction.label_ids)
                prefix = f"{metric_key_prefix}_{task}"
                result = super().evaluate(dataset, ignore_keys, prefix)
                metrics.update(result)
                scores.append(main_score(row, _strip_prefix(result, prefix)))
            metrics[f"{metric_key_prefix}_main_score"] = float(np.mean(scores))
            self.log({f"{metric_key_prefix}_main_score": metrics[f"{metric_key_prefix}_main_score"]})
            return metrics

    return _GlueTrainer


TRAINER_RUNTIME_KEYS = ("runtime", "samples_per_second", "steps_per_second")


def _strip_prefix(metrics: dict, prefix: str) -> dict[str, float]:
    """``{metric: value}`` of one task from the Trainer's ``<prefix>_<metric>`` keys (runtime keys left out)."""
    start = f"{prefix}_"
    return {key[len(start):]: value for key, value in metrics.items()
            if key.startswith(start) and key[len(start):] not in TRAINER_RUNTIME_KEYS}


def training_history(log_history: list[dict], tasks: list[str]) -> list[dict]:
    """One entry per epoch from the Trainer's log: train loss, each task's validation metrics, the score."""
    by_step: dict[int, dict] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None or "train_runtime" in entry:
            continue
        record = by_step.setdefault(step, {"epoch": int(round(entry["epoch"])), "step": step, "validation": {}})
        if "loss" in entry:
            record["train_loss"] = entry["loss"]
        for task in tasks:
            metrics = _strip_prefix(entry, f"eval_{task}")
            if metrics:
                record["validation"][task] = metrics
        if "eval_main_score" in entry:
            record["validation_score"] = entry["eval_main_score"]
    return [record for _, record in sorted(by_step.items()) if "validation_score" in record]


def training_arguments(options: "TrainOptions", config: dict, learning_rate: float, seed: int, output_dir: Path, device):
    """The original's ``TrainingArguments`` (module docstring) from the config's "training" values."""
    from transformers import TrainingArguments

    training = config["training"]
    return TrainingArguments(
        output_dir=str(output_dir), learning_rate=learning_rate, num_train_epochs=options.num_epochs,
        per_device_train_batch_size=options.batch_size, per_device_eval_batch_size=options.batch_size,
        warmup_steps=float(training["warmup_ratio"]),  # a float in [0, 1) is a ratio of the total steps
        weight_decay=training["weight_decay"], adam_beta1=training["adam_beta1"], adam_beta2=training["adam_beta2"],
        adam_epsilon=training["adam_epsilon"], max_grad_norm=training["max_grad_norm"], lr_scheduler_type="linear",
        optim="adamw_torch", eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch",
        load_best_model_at_end=True, metric_for_best_model="main_score", greater_is_better=True,
        save_total_limit=1, save_only_model=True, seed=seed,
        train_sampling_strategy="group_by_length" if options.group_by_length else "random",
        label_names=["labels"], remove_unused_columns=False, report_to=list(options.report_to) or "none",
        disable_tqdm=not options.progress, use_cpu=device.type == "cpu", dataloader_pin_memory=device.type == "cuda",
        bf16=options.precision == "bf16", fp16=options.precision == "fp16",
    )


def train_with_trainer(model: nn.Module, tokenizer, train_set: Dataset, validation_sets: dict[str, Dataset], rows: dict[str, dict],
                       arguments) -> dict:
    """Fine-tune ``model`` with the Trainer; the best epoch's weights are loaded into the returned model's
    place (``model`` is trained in place). Returns the history and the best epoch."""
    trainer = make_trainer_class()(
        model=model, args=arguments, train_dataset=train_set, eval_dataset=validation_sets, data_collator=make_collator(tokenizer),
        processing_class=tokenizer, task_rows=rows, validation_sets=validation_sets,
        callbacks=[callback for callback in [sweep_progress.trainer_callback("train " + "+".join(rows))] if callback],
    )
    output = trainer.train()
    history = training_history(trainer.state.log_history, list(rows))
    best = next((record for record in history if record["step"] == trainer.state.best_global_step), None)
    return {
        "trainer": trainer,
        "history": history,
        "best_epoch": None if best is None else best["epoch"],
        "best_validation_score": trainer.state.best_metric,
        "total_steps": trainer.state.max_steps,
        "train_loss": output.training_loss,
    }


@dataclass(frozen=True)
class TrainOptions:
    """train_plms_glue.py's runs: ``tasks`` is [target] or [auxiliary, target] (multitask); ``learning_rate``
    None = the config's table for (model, target). ``flags`` is the command line, recorded in every result."""

    language_model_name: str
    tasks: tuple[str, ...]
    multitask: bool
    learning_rate: float | None
    batch_size: int
    num_epochs: int
    num_runs: int
    seed: int
    max_seq_length: int
    group_by_length: bool
    overwrite: bool
    allow_pickle: bool
    glue_dir: str | None
    max_train_samples: int | None
    max_eval_samples: int | None
    save_dir: str
    progress: bool
    flags: dict
    precision: str = "fp32"
    report_to: tuple[str, ...] = ()
    max_validation_samples: int | None = None   # cap of validation only (default: max_eval_samples)


def build_model(options: TrainOptions, rows: dict[str, dict]):
    """The pretrained encoder with a fresh head (multitask: one head per task on the shared encoder)."""
    if options.multitask:
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(options.language_model_name, use_safetensors=None if options.allow_pickle else True)
        return MultiTaskModel(encoder, rows)
    (row,) = rows.values()
    return load_classifier(options.language_model_name, allow_pickle=options.allow_pickle, num_labels=row["num_labels"])


STATE_FILE = "training_state.json"          # written by save_trained: the folder is this project's
ORIGINAL_STATE_FILE = "trainer_state.json"  # the original MergeLM's marker of a trained checkpoint


class CheckpointNotOursError(ValueError):
    """A checkpoint folder exists that this project did not write (and --overwrite was not given)."""


def weight_settings(options: TrainOptions, learning_rate: float, seed: int) -> dict:
    """The settings that determine a checkpoint's weights (recorded in training_state.json)."""
    return {"language_model_name": str(options.language_model_name), "tasks": list(options.tasks),
            "learning_rate": learning_rate, "batch_size": options.batch_size, "num_epochs": options.num_epochs,
            "seed": seed, "max_seq_length": options.max_seq_length, "group_by_length": options.group_by_length,
            "max_train_samples": options.max_train_samples, "precision": options.precision}


def existing_checkpoint(model_dir: Path, options: TrainOptions, settings: dict | None = None) -> str | None:
    """What to do with an existing checkpoint folder: None (absent, or --overwrite: train), "ours" (written
    by save_trained: evaluate it), "original" (a single-task folder of the original code, which has
    ``trainer_state.json``: evaluate it, as the original did). Anything else is refused, never deleted, and so
    is a folder of ours trained with other ``settings`` (weight_settings) than this run asks for: reusing it
    would report another model under this run's settings."""
    if options.overwrite or not model_dir.exists():
        return None
    if (model_dir / STATE_FILE).is_file():
        recorded = json.loads((model_dir / STATE_FILE).read_text(encoding="utf-8")).get("settings")
        if settings is not None and recorded is not None:
            changed = [key for key in settings if key in recorded and recorded[key] != settings[key]]
            if changed:
                key = changed[0]
                raise CheckpointNotOursError(
                    f"checkpoint folder {model_dir} was trained with {key} = {recorded[key]!r}, this run asks for "
                    f"{settings[key]!r}; pass --overwrite to retrain it, or another --save_dir")
        return "ours"
    if (model_dir / ORIGINAL_STATE_FILE).is_file() and not options.multitask:
        return "original"
    raise CheckpointNotOursError(
        f"checkpoint folder {model_dir} exists but was not written by train_plms_glue.py (no {STATE_FILE}"
        + ("" if options.multitask else f" or {ORIGINAL_STATE_FILE}") + "); pass --overwrite to replace it, or move it away"
    )


def save_trained(model, tokenizer, rows: dict[str, dict], training: dict, target: Path, overwrite: bool,
                 pretrained: str) -> None:
    """Write the checkpoint folder (model, multitask heads, tokenizer, training_state.json) atomically;
    an existing folder is replaced only with ``overwrite``."""
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        if isinstance(model, MultiTaskModel):
            save_pretrained_safetensors(model.encoder, folder)
            heads = {f"{task}.{name}": tensor.detach().cpu().contiguous() for task, head in model.heads.items() for name, tensor in head.state_dict().items()}
            save_file(heads, str(folder / "multitask_heads.safetensors"))
            write_json_atomic(folder / "multitask_config.json", {"tasks": rows})
        else:
            save_pretrained_safetensors(model, folder)
        tokenizer.save_pretrained(folder)
        write_json_atomic(folder / STATE_FILE, {"best_epoch": training["best_epoch"], "history": training["history"],
                                                "settings": training.get("settings")})

    write_folder_atomic(target, write, overwrite=overwrite, inputs={"--language_model_name": pretrained},
                        role="checkpoint folder")


def load_trained(model_dir: Path, rows: dict[str, dict], allow_pickle: bool = False):
    """A checkpoint written by save_trained (single-task classifier or multitask encoder + heads), or a
    single-task checkpoint of the original code (pickled weights need ``allow_pickle``)."""
    if (model_dir / "multitask_heads.safetensors").is_file():
        from safetensors.torch import load_file
        from transformers import AutoModel

        model = MultiTaskModel(AutoModel.from_pretrained(str(model_dir), use_safetensors=True), rows)
        heads = load_file(str(model_dir / "multitask_heads.safetensors"))
        for task, head in model.heads.items():
            head.load_state_dict({name: heads[f"{task}.{name}"] for name in head.state_dict()})
        return model
    return load_classifier(model_dir, allow_pickle=allow_pickle)


def train_run(options: TrainOptions, config: dict, data: dict, tokenizer, device, run: int) -> dict:
    """Train (or reuse) run ``run`` (seed + run) and write its checkpoint and result JSON; returns the result."""
    import shutil

    tasks = list(options.tasks)
    short = model_short_name(options.language_model_name)
    rows = {task: task_info(config, task) for task in tasks}
    learning_rate = task_learning_rate(config, short, tasks[-1], options.learning_rate)
    name = checkpoint_name(short, learning_rate, run)
    model_dir = checkpoint_dir(options.save_dir, tasks, name)
    result_path = model_result_path(options.save_dir, tasks, name)
    seed = options.seed + run
    set_random_seed(seed)
    encoded = {task: {split: encode_split(tokenizer, data[task][split], rows[task], options.max_seq_length) for split in data[task]} for task in tasks}
    train_set = ConcatDataset([encoded[task]["train"] for task in tasks]) if len(tasks) > 1 else encoded[tasks[0]]["train"]
    eval_loaders = {split: {task: make_loader(encoded[task][split], tokenizer, options.batch_size, shuffle=False) for task in tasks}
                    for split in ("validation", "test")}
    started = time.time()
    settings = weight_settings(options, learning_rate, seed)
    existing = existing_checkpoint(model_dir, options, settings)
    trainer = None
    if existing is not None:
        model = load_trained(model_dir, rows, allow_pickle=options.allow_pickle)
        training = {"reused_checkpoint": str(model_dir), "written_by": "train_plms_glue.py" if existing == "ours" else "original MergeLM"}
    else:
        if len(train_set) == 0:
            raise ValueError("no training steps: the train split is empty")
        model = build_model(options, rows)
        # The Trainer's epoch checkpoints: a working folder of this run, removed when the run ends (and, if
        # a run was killed, by the next run into the same checkpoint folder).
        remove_stale_staging(model_dir, kind="trainer")
        work_dir = model_dir.parent / f".{model_dir.name}.trainer-{os.getpid()}"
        arguments = training_arguments(options, config, learning_rate, seed, work_dir, device)
        try:
            training = train_with_trainer(model, tokenizer, train_set, {task: encoded[task]["validation"] for task in tasks}, rows, arguments)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        trainer = training.pop("trainer")
        model = trainer.model
        training["training_arguments"] = json.loads(arguments.to_json_string())
        training["settings"] = settings
    if trainer is not None and not trainer.is_world_process_zero():
        return {}
    model.to(device)
    test = {task: evaluate_task(model, loader, rows[task], device, progress=options.progress, description=f"test {task}")
            for task, loader in eval_loaders["test"].items()}
    validation = {task: evaluate_task(model, loader, rows[task], device) for task, loader in eval_loaders["validation"].items()}
    result = {
        "script": "train_plms_glue.py",
        "config": {**options.flags, "learning_rate": learning_rate, "run": run, "tasks": tasks},
        "seeds": {"run_seed": seed, "split_seed": config["splits"]["split_seed"]},
        "versions": library_versions(),
        "num_examples": {task: {split: len(data[task][split]) for split in data[task]} for task in tasks},
        "training": training,
        "validation_metrics": validation,
        "test_metrics": test,
        "wall_time_s": time.time() - started,
        "checkpoint": str(model_dir),
    }
    if existing is None:
        save_trained(model, tokenizer, rows, training, model_dir, overwrite=options.overwrite,
                     pretrained=options.language_model_name)
    write_json_atomic(result_path, result)
    return result


def run_training(options: TrainOptions, config: dict, device) -> list[dict]:
    """Check every run's checkpoint folder (refuse folders this project did not write before training
    anything), load the tasks' splits and the tokenizer once, then train every run; prints each run's
    test metrics."""
    from transformers import AutoTokenizer

    short = model_short_name(options.language_model_name)
    learning_rate = task_learning_rate(config, short, options.tasks[-1], options.learning_rate)
    source = Path(options.language_model_name).expanduser()
    for run in range(options.num_runs):
        model_dir = checkpoint_dir(options.save_dir, list(options.tasks), checkpoint_name(short, learning_rate, run))
        # the one output guard (utils/records.py): --overwrite would replace the pretrained model
        check_output_folder(model_dir, {"--language_model_name": source}, overwrite=True, role="checkpoint folder",
                            advice="--save_dir")
        existing_checkpoint(model_dir, options, weight_settings(options, learning_rate, options.seed + run))
    data = {task: load_task_splits(task, config, options.glue_dir, max_train_samples=options.max_train_samples,
                                   max_eval_samples=options.max_eval_samples, max_validation_samples=options.max_validation_samples)
            for task in options.tasks}
    tokenizer = AutoTokenizer.from_pretrained(options.language_model_name)
    results = []
    for run in range(options.num_runs):
        result = train_run(options, config, data, tokenizer, device, run)
        if result:
            print(f"run {run}: test " + ", ".join(f"{task}: {m}" for task, m in result["test_metrics"].items()))
        results.append(result)
    return results
