"""A homologous LLM family built from one real model: supervised fine-tunes of θ_pre on one skill each.

The paper's LLM experiments merge WizardLM / WizardMath / Code Alpaca, fine-tunes of one Llama-2 backbone. No
packaged model here ships a base and a fine-tune of it, so this module makes the family: each expert is θ_pre
(by default SmolLM2-135M-Instruct, utils/llm/smollm2.py) fine-tuned on all parameters with transformers'
``Trainer`` on one skill's *training* data, so δ = θ_expert − θ_pre is a real SFT delta.

Data (declared in ``configs/llm_family.yaml``; never the evaluation splits):
* ``gsm8k_train``: GSM8K train (7,473 problems; ``gsm8k_train.jsonl``). Response = the reference solution with
  the calculator annotations ``<<…>>`` removed and the final ``#### N`` line replaced by ``The answer is: N``,
  the form the project's GSM8K scorer reads (utils/llm/scoring.py).
* ``mbpp_train``: MBPP's train (task ids 601–974) and validation (511–600) problems of ``mbpp_full.jsonl``;
  task ids 11–510 (the test split the evaluation uses) and 1–10 (the few-shot prompts) are refused by
  :func:`mbpp_train_records`. Response = the reference code in a ```python block.

Prompts are the evaluation's own prompt templates (``configs/llm_tasks.yaml``) put through the model's chat
template with a generation prompt; the loss is on the response tokens only (prompt tokens get label −100).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from utils.llm.benchmarks import fenced_python, gsm8k_response
from utils.llm.nll import encode_pair

MBPP_TEST_IDS = range(11, 511)      # the evaluation split (mbpp.test.jsonl)
MBPP_PROMPT_IDS = range(1, 11)      # the original few-shot prompt problems
MBPP_TRAIN_IDS = range(511, 975)    # validation 511–600 and train 601–974


@dataclass(frozen=True)
class ExpertSpec:
    """One expert of the family: what it is trained on and how (declared in configs/llm_family.yaml)."""

    name: str
    dataset: str            # gsm8k_train | mbpp_train
    template: str           # prompt template name in configs/llm_tasks.yaml
    max_steps: int
    batch_size: int
    max_length: int         # prompt + response tokens; longer examples are dropped (counted in the manifest)
    learning_rate: float
    seed: int = 0
    max_examples: int | None = None   # first N training examples after the seeded shuffle and the hold-out
    validation_size: int = 100        # held back from training (first of the seeded shuffle): the validation

    def held_back(self, available: int) -> int:
        """How many problems the validation holds back: validation_size, at most half of what is available."""
        return min(self.validation_size, available // 2)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def mbpp_train_records(records: list[dict]) -> list[dict]:
    """MBPP problems with a train or validation task id; the test and prompt ids never pass."""
    kept = [r for r in records if int(r["task_id"]) in MBPP_TRAIN_IDS]
    assert not any(int(r["task_id"]) in MBPP_TEST_IDS or int(r["task_id"]) in MBPP_PROMPT_IDS for r in kept)
    return kept


def training_pairs(dataset: str, template: str, data_dir: Path) -> list[tuple[str, str]]:
    """(prompt, response) pairs of one training dataset in file order; the prompt is the evaluation's chat
    instruction ``chat.instructions[template]`` of configs/llm_tasks.yaml filled with the record's input, built
    as the evaluation builds it (utils/llm/prompts.py)."""
    from utils.llm.prompts import load_task_config, mbpp_input

    config = load_task_config()
    instruction = config["chat"]["instructions"][template]

    def read(name: str) -> list[dict]:
        with open(data_dir / name, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    if dataset == "gsm8k_train":
        return [(instruction.format(input=r["question"]), gsm8k_response(r["answer"]))
                for r in read("gsm8k_train.jsonl")]
    if dataset == "mbpp_train":
        return [(instruction.format(input=mbpp_input(r, config)),
                 fenced_python(r["code"]))
                for r in mbpp_train_records(read("mbpp_full.jsonl"))]
    raise ValueError(f"dataset: unknown training dataset {dataset!r} (gsm8k_train, mbpp_train)")


class _SFTDataset:
    def __init__(self, rows: list[tuple[list[int], list[int]]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        ids, labels = self.rows[index]
        return {"input_ids": ids, "labels": labels}


def sft_examples(spec: ExpertSpec, tokenizer, data_dir: Path) -> tuple[list, dict]:
    """Encoded training rows (seeded shuffle, validation held back, first max_examples, longer than max_length
    dropped) and counts."""
    import random

    pairs = training_pairs(spec.dataset, spec.template, data_dir)
    order = list(range(len(pairs)))
    random.Random(spec.seed).shuffle(order)
    order = order[spec.held_back(len(pairs)):]          # the validation problems are never trained on
    if spec.max_examples:
        order = order[:spec.max_examples]
    rows, dropped = [], 0
    for index in order:
        ids, labels = encode_pair(tokenizer, *pairs[index])
        if len(ids) > spec.max_length:
            dropped += 1
            continue
        rows.append((ids, labels))
    return rows, {"available": len(pairs), "held_back_validation": spec.held_back(len(pairs)), "used": len(rows),
                  "dropped_too_long": dropped}


def train_expert(spec: ExpertSpec, base: Path, output_dir: Path, data_dir: Path, *, work_dir: Path,
                 progress: bool = True) -> dict:
    """Fine-tune all parameters of ``base`` on ``spec``'s data with the Trainer (AdamW, linear decay, 3% warm-up,
    float32 on the CPU); saves the model and tokenizer into ``output_dir`` (which must not exist: the caller
    publishes a staging folder) and returns the training record. Resumes from the Trainer's last checkpoint
    in ``work_dir`` when there is one (checkpoints every 50 steps)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, counts = sft_examples(spec, tokenizer, data_dir)
    if not rows:
        raise ValueError(f"{spec.name}: no training example fits max_length {spec.max_length}")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    def collate(batch: list[dict]) -> dict:
        width = max(len(row["input_ids"]) for row in batch)
        return {"input_ids": torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch]),
                "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch]),
                "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                                for r in batch])}

    arguments = TrainingArguments(
        output_dir=str(work_dir), max_steps=spec.max_steps, per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate, lr_scheduler_type="linear", warmup_steps=max(1, spec.max_steps * 3 // 100),
        weight_decay=0.0, logging_steps=max(1, min(10, spec.max_steps // 2)), save_steps=50, save_total_limit=1, seed=spec.seed,
        data_seed=spec.seed, report_to=[], disable_tqdm=not progress, use_cpu=True, dataloader_num_workers=0,
        remove_unused_columns=False)
    from utils.progress import trainer_callback

    callback = trainer_callback("sft")
    trainer = Trainer(model=model, args=arguments, train_dataset=_SFTDataset(rows), data_collator=collate,
                      callbacks=[callback] if callback else None)
    resume = get_last_checkpoint(str(work_dir)) if work_dir.is_dir() else None
    result = trainer.train(resume_from_checkpoint=resume)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"spec": spec.describe(), "data": counts, "resumed_from": resume,
            "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
            "train_runtime_s": result.metrics.get("train_runtime"), "log_history": trainer.state.log_history}
