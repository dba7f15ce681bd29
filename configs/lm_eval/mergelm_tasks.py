"""Data and metrics of the offline lm-eval tasks in this folder (loaded by lm-eval's ``!function`` tag).

The data come from the project's own loaders (utils/llm/data.py), so the files are found where every other
LLM evaluation finds them: the ``data_dir`` metadata the bridge passes (``--data_dir``), else
``$MATH_CODE_DATA_DIR``, else ``./math_code_data``. Nothing is fetched from the hub.

Code is scored by the project's sandbox (utils/llm/sandbox.py), never by ``evaluate``'s ``code_eval``
(which executes model-written code in the evaluating process): a task's target is a JSON reference
(the fields that build the program) and ``pass_at_1`` runs the program that human-eval / bigcode run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import datasets

from utils.llm.data import load_gsm8k, load_human_eval, load_mbpp, read_jsonl, resolve_data_dir
from utils.llm.sandbox import run_program
from utils.llm.scoring import human_eval_program, mbpp_program



def _dataset(records: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(records)


def _data_dir(metadata: dict):
    return resolve_data_dir(metadata.get("data_dir"))


def gsm8k(**metadata) -> datasets.DatasetDict:
    """GSM8K test (1,319) and, for few-shot examples, train (gsm8k_train.jsonl next to the test file)."""
    examples, source = load_gsm8k(_data_dir(metadata))
    test = [{"question": e.record["question"], "answer": e.record["answer"]} for e in examples]
    splits = {"test": _dataset(test)}
    train_file = _data_dir(metadata) / "gsm8k_train.jsonl"
    if not train_file.is_file():
        raise FileNotFoundError(f"{train_file} not found: lm-eval's gsm8k draws its few-shot examples from GSM8K "
                                f"train (gsm8k_train.jsonl next to gsm8k_test.jsonl)")
    splits["train"] = _dataset([{"question": r["question"], "answer": r["answer"]} for r in read_jsonl(train_file)])
    return datasets.DatasetDict(splits)


def mbpp(**metadata) -> datasets.DatasetDict:
    """MBPP test (task ids 11-510) with a JSON ``reference`` (test_list) for the sandboxed metric."""
    examples, _ = load_mbpp(_data_dir(metadata))
    rows = [{"task_id": int(e.record["task_id"]), "text": e.record["text"], "code": e.record["code"],
             "test_list": list(e.record["test_list"]), "reference": json.dumps({"test_list": list(e.record["test_list"])})}
            for e in examples]
    return datasets.DatasetDict({"test": _dataset(rows)})


def mbpp_fewshot() -> list[dict]:
    """MBPP's prompt examples (task ids 2-4 of the full release, the three lm-eval's mbpp shows), stored next to
    this file (mbpp_prompt_examples.json, CC BY 4.0, Austin et al. 2021)."""
    records = json.loads((Path(__file__).with_name("mbpp_prompt_examples.json")).read_text(encoding="utf-8"))
    return [{**record, "is_fewshot": True} for record in records]


def humaneval(**metadata) -> datasets.DatasetDict:
    """HumanEval (164) from the human-eval package, task ids sorted as strings (the project's order)."""
    examples, _ = load_human_eval()
    rows = [{"task_id": e.task_id, "prompt": e.record["prompt"],
             "reference": json.dumps({k: e.record[k] for k in ("prompt", "test", "entry_point")})} for e in examples]
    return datasets.DatasetDict({"test": _dataset(rows)})


def pass_at_1(references: list[str], predictions: list[str], **_) -> float:
    """1.0 when the program (completion + the reference's tests) passes in the sandbox, else 0.0."""
    reference = json.loads(references[0])
    completion = predictions[0]
    if "entry_point" in reference:
        program = human_eval_program(reference, completion)
    else:
        program = mbpp_program(reference, completion)
    return 1.0 if run_program(program).passed else 0.0


def answer_nll(doc: dict, results: list) -> dict:
    """−log p(target | prompt) of the gold answer, in nats, and per UTF-8 byte of the answer; 1.0 in
    ``greedy`` when every answer token is the model's argmax."""
    loglikelihood, is_greedy = results[0]
    size = max(1, len(_target_text(doc).encode("utf-8")))
    return {"answer_nll": -float(loglikelihood), "answer_nll_per_byte": -float(loglikelihood) / size,
            "greedy": float(bool(is_greedy))}


def _target_text(doc: dict) -> str:
    return doc.get("answer") if "answer" in doc else doc["code"]


def mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)
