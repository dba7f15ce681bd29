"""Tokenisation, models, losses, a plain torch fine-tuning loop, evaluation, and the training runs of
train_plms_glue.py (checkpoint + result JSON per run) for GLUE.

Losses (as the original MergeLM):
  single task: cross-entropy on the logits when the head has more than one output, else MSE between the
  squeezed logit and the score (STS-B);
  multitask: for each task present in the batch, that task's loss on its rows (CE on the task's first
  ``num_labels`` logit columns, or MSE on column 0 for STS-B); the per-task losses are SUMMED.
Optimisation (HF Trainer defaults the original relied on): AdamW (β = 0.9, 0.999, ε = 1e-8) with weight
decay 0.01 on all parameters except biases and LayerNorm weights; learning rate warmed up linearly over
ceil(0.06 · T) steps then decayed linearly to 0 at T = epochs · batches per epoch; gradient norm clipped
at 1.0. After every epoch the model is evaluated on the validation split and the best epoch (strictly
higher main score; multitask: mean over tasks) is restored at the end.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from utils.cli import set_random_seed
from utils.glue.checkpoints import (checkpoint_dir, checkpoint_name, load_classifier, model_result_path, model_short_name,
                                    save_pretrained_safetensors, task_learning_rate)
from utils.glue.data import load_task_splits, task_info
from utils.glue.metrics import main_score, task_metrics
from utils.records import library_versions, write_folder_atomic, write_json_atomic

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


class LengthGroupedSampler(Sampler):
    """HF Trainer's ``group_by_length`` order: a random permutation cut into mega-batches of
    50 · batch_size examples, each sorted by decreasing length (the longest example first overall), so
    batches hold examples of similar length and need less padding. A new permutation every epoch."""

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator, mega_batch_mult: int = 50):
        self.lengths, self.generator, self.size = lengths, generator, mega_batch_mult * batch_size

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        megabatches = [sorted(order[i : i + self.size], key=lambda j: -self.lengths[j]) for i in range(0, len(order), self.size)]
        if megabatches:
            longest = max(range(len(megabatches)), key=lambda m: self.lengths[megabatches[m][0]])
            megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
        return iter([index for megabatch in megabatches for index in megabatch])


def _lengths(dataset: Dataset) -> list[int]:
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    return [len(item["input_ids"]) for part in parts for item in part.features]


def make_loader(dataset: Dataset, tokenizer, batch_size: int, *, shuffle: bool, seed: int = 0, group_by_length: bool = False) -> DataLoader:
    """DataLoader with dynamic padding.

    shuffle=True (training, statistics): random order from a torch Generator seeded with ``seed``
    (``group_by_length``: ``LengthGroupedSampler``, an option of the HF Trainer, off in the paper).
    shuffle=False (evaluation): batches of similar length (``length_sorted_batches``).
    """
    collate = make_collator(tokenizer)
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        if group_by_length:
            sampler = LengthGroupedSampler(_lengths(dataset), batch_size, generator)
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)
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
    for batch in tqdm(loader, desc=description, disable=not progress, leave=False):
        batch = to_device(batch, device)
        all_logits.append(model_logits(model, batch).float().cpu())
        all_labels.append(batch["labels"].cpu())
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy()


def evaluate_task(model: nn.Module, loader: DataLoader, task_row: dict, device, *, progress: bool = False, description: str = "eval") -> dict:
    """``{"loss": mean loss, <metrics>...}`` of one task's split."""
    logits, labels = predict(model, loader, device, progress=progress, description=description)
    loss = task_loss(torch.from_numpy(logits), torch.from_numpy(labels), task_row["num_labels"]).item()
    return {"loss": loss, **task_metrics(task_row, logits, labels)}


@dataclass
class TrainingSettings:
    learning_rate: float
    num_epochs: int
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    progress: bool = True


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on every parameter except biases and LayerNorm parameters (HF Trainer's rule)."""
    no_decay = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            no_decay.update(f"{module_name}.{name}" if module_name else name for name, _ in module.named_parameters(recurse=False))
    decay, plain = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (plain if name in no_decay or name.endswith("bias") else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def train_model(
    model: nn.Module,
    train_loader: DataLoader,
    validation_loaders: dict[str, DataLoader],
    tasks: dict[str, dict],
    settings: TrainingSettings,
    device,
) -> dict:
    """Fine-tune ``model`` in place; returns the history and the restored best epoch.

    ``validation_loaders`` maps each task to its validation loader; the epoch score is the mean of the
    tasks' main scores, and the best epoch (strict improvement) is restored at the end.
    """
    from transformers import get_linear_schedule_with_warmup

    model.to(device)
    total_steps = len(train_loader) * settings.num_epochs
    if total_steps == 0:
        raise ValueError("no training steps: the train split or the number of epochs is empty")
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, settings.weight_decay),
        lr=settings.learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
        eps=settings.adam_epsilon,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(total_steps * settings.warmup_ratio), total_steps)
    history, best_score, best_state, best_epoch = [], -math.inf, None, None
    for epoch in range(1, settings.num_epochs + 1):
        model.train()
        losses = []
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{settings.num_epochs}", disable=not settings.progress)
        for batch in bar:
            batch = to_device(batch, device)
            loss = batch_loss(model_logits(model, batch), batch, tasks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        validation = {
            task: evaluate_task(model, loader, tasks[task], device, progress=settings.progress, description=f"validate {task}")
            for task, loader in validation_loaders.items()
        }
        score = float(np.mean([main_score(tasks[task], metrics) for task, metrics in validation.items()]))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "validation": validation, "validation_score": score})
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {"history": history, "best_epoch": best_epoch, "best_validation_score": best_score, "total_steps": total_steps}


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


def build_model(options: TrainOptions, rows: dict[str, dict]):
    """The pretrained encoder with a fresh head (multitask: one head per task on the shared encoder)."""
    if options.multitask:
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(options.language_model_name, use_safetensors=None if options.allow_pickle else True)
        return MultiTaskModel(encoder, rows)
    (row,) = rows.values()
    return load_classifier(options.language_model_name, allow_pickle=options.allow_pickle, num_labels=row["num_labels"])


def save_trained(model, tokenizer, rows: dict[str, dict], training: dict, target: Path) -> None:
    """Write the checkpoint folder (model, multitask heads, tokenizer, training_state.json) atomically,
    replacing the one this run re-trained."""
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
        write_json_atomic(folder / "training_state.json", {"best_epoch": training["best_epoch"], "history": training["history"]})

    write_folder_atomic(target, write, overwrite=True)


def load_trained(model_dir: Path, rows: dict[str, dict]):
    """A checkpoint written by save_trained (single-task classifier or multitask encoder + heads)."""
    if (model_dir / "multitask_heads.safetensors").is_file():
        from safetensors.torch import load_file
        from transformers import AutoModel

        model = MultiTaskModel(AutoModel.from_pretrained(str(model_dir), use_safetensors=True), rows)
        heads = load_file(str(model_dir / "multitask_heads.safetensors"))
        for task, head in model.heads.items():
            head.load_state_dict({name: heads[f"{task}.{name}"] for name in head.state_dict()})
        return model
    return load_classifier(model_dir)


def train_run(options: TrainOptions, config: dict, data: dict, tokenizer, device, run: int) -> dict:
    """Train (or reuse) run ``run`` (seed + run) and write its checkpoint and result JSON; returns the result."""
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
    train_loader = make_loader(train_set, tokenizer, options.batch_size, shuffle=True, seed=seed, group_by_length=options.group_by_length)
    eval_loaders = {split: {task: make_loader(encoded[task][split], tokenizer, options.batch_size, shuffle=False) for task in tasks}
                    for split in ("validation", "test")}
    started = time.time()
    reused = model_dir.is_dir() and (model_dir / "training_state.json").is_file() and not options.overwrite
    if reused:
        model = load_trained(model_dir, rows)
        training = {"reused_checkpoint": str(model_dir)}
    else:
        model = build_model(options, rows)
        settings = TrainingSettings(
            learning_rate=learning_rate,
            num_epochs=options.num_epochs,
            **{key: config["training"][key] for key in ("warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm")},
            progress=options.progress,
        )
        training = train_model(model, train_loader, eval_loaders["validation"], rows, settings, device)
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
    if not reused:
        save_trained(model, tokenizer, rows, training, model_dir)
    write_json_atomic(result_path, result)
    return result


def run_training(options: TrainOptions, config: dict, device) -> list[dict]:
    """Load the tasks' splits and the tokenizer once, then train every run; prints each run's test metrics."""
    from transformers import AutoTokenizer

    data = {task: load_task_splits(task, config, options.glue_dir, max_train_samples=options.max_train_samples,
                                   max_eval_samples=options.max_eval_samples) for task in options.tasks}
    tokenizer = AutoTokenizer.from_pretrained(options.language_model_name)
    results = []
    for run in range(options.num_runs):
        result = train_run(options, config, data, tokenizer, device, run)
        print(f"run {run}: test " + ", ".join(f"{task}: {m}" for task, m in result["test_metrics"].items()))
        results.append(result)
    return results
