"""End-to-end scoring and output files with a scripted backend (known completions -> known metrics)."""
from __future__ import annotations

import json

import pytest

from llm_helpers import ALPACA_RECORDS, MBPP_RECORDS, ScriptedBackend, write_data_dir
from utils.llm.data import load_human_eval
from utils.llm.evaluation import EvalOptions, evaluate_dataset, result_folder
from utils.records import write_json_atomic


@pytest.fixture()
def options(tmp_path):
    data = write_data_dir(tmp_path / "data")
    return EvalOptions(save_dir=str(tmp_path / "out"), save_name="scripted_model", data_dir=str(data),
                       alpaca_eval_path=str(data / "alpaca_eval.json"), code_timeout=5.0, seed=11)


def _records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_gsm8k_scores_and_files(options):
    answers = {"Tom has": "3 + 4 = 7. The answer is: 7", "A shop": "The answer is: 2,400 pens",
               "The temperature": "It is cold."}
    backend = ScriptedBackend(lambda prompt: next(v for k, v in answers.items() if k in prompt))
    summary = evaluate_dataset(backend, "gsm8k", options)
    assert summary["metrics"] == {"num_examples": 3, "accuracy": pytest.approx(2 / 3), "num_correct": 2,
                                  "num_invalid": 1}
    assert backend.params[0].stop == ("Instruction:", "Instruction", "Response:", "Response")
    assert backend.params[0].max_new_tokens == 1024 and backend.params[0].seed == 11
    folder = result_folder(options.save_dir, "gsm8k", "scripted_model")
    assert folder.parts[-3:] == ("save_gen_math_results", "gsm8k", "scripted_model")
    rows = _records(folder / "records.jsonl")
    assert [(row["extracted"], row["gold"], row["correct"]) for row in rows] == \
        [(7, 7, True), (2400, 2400, True), (None, -3, False)]
    assert rows[0]["prompt"].endswith("### Response: Let's think step by step.")
    saved = json.loads((folder / "summary.json").read_text())
    assert saved["metrics"]["num_correct"] == 2 and saved["seed"] == 11
    assert saved["data"]["num_total"] == 3 and saved["versions"]["torch"]
    assert saved["throughput"]["tokens_per_second"] == pytest.approx(6.0)


def test_math_slice(options):
    options.start_index, options.end_index = 0, 1
    backend = ScriptedBackend(lambda prompt: "So the sum is three quarters. The answer is: \\dfrac{3}{4}.")
    summary = evaluate_dataset(backend, "MATH", options)
    assert summary["metrics"]["accuracy"] == 1.0 and summary["metrics"]["num_examples"] == 1
    assert backend.params[0].max_new_tokens == 2048


def test_mbpp_execution_and_bigcode_file(options):
    def reply(prompt):
        if "add two numbers" in prompt:
            return "```python\ndef add(a, b):\n\treturn a + b\n```\nThis adds."
        return "def square(x):\n    return x + x\n# Test examples\nprint(square(2))"
    summary = evaluate_dataset(ScriptedBackend(reply), "mbpp", options)
    assert summary["metrics"]["pass@1"] == 0.5 and summary["metrics"]["num_correct"] == 1
    folder = result_folder(options.save_dir, "mbpp", "scripted_model")
    rows = _records(folder / "records.jsonl")
    assert rows[0]["extracted"] == "def add(a, b):\n    return a + b"
    assert rows[0]["execution"]["status"] == "passed" and rows[1]["execution"]["status"] == "failed"
    combined = json.loads(folder.with_name("scripted_model.jsonl").read_text())
    assert combined == [["def add(a, b):\n    return a + b"], ["def square(x):\n    return x + x"]]
    assert len(combined) == len(MBPP_RECORDS)


def test_human_eval_execution_and_samples(options):
    examples, _ = load_human_eval()
    first = examples[0].record
    options.end_index = 2

    def reply(prompt):
        if first["entry_point"] in prompt:
            return "```python\n" + first["prompt"] + first["canonical_solution"] + "```"
        return "while True:\n    pass"
    options.code_timeout = 1.0
    summary = evaluate_dataset(ScriptedBackend(reply), "human_eval", options)
    assert summary["metrics"] == {"num_examples": 2, "pass@1": 0.5, "num_correct": 1}
    folder = result_folder(options.save_dir, "human_eval", "scripted_model")
    samples = _records(folder.with_name("scripted_model.jsonl"))
    assert [sample["task_id"] for sample in samples] == ["HumanEval/0", "HumanEval/1"]
    assert set(samples[0]) == {"task_id", "completion", "all_code"}
    rows = _records(folder / "records.jsonl")
    assert rows[1]["execution"]["status"] == "timeout"
    assert rows[1]["correct"] is False


def test_alpaca_eval_model_outputs(options):
    options.tasks, options.generator_name = "instruct_math", "merged-model"
    summary = evaluate_dataset(ScriptedBackend(lambda prompt: " Answer."), "alpaca_eval", options)
    assert summary["metrics"] == {"num_examples": 2}
    folder = result_folder(options.save_dir, "alpaca_eval", "scripted_model", "instruct_math")
    assert folder.parts[-4:] == ("save_gen_instruct_responses_results", "instruct_math", "alpaca_eval",
                                 "scripted_model")
    outputs = json.loads(folder.with_name("scripted_model.json").read_text())
    assert outputs == [{"instruction": record["instruction"], "output": " Answer.", "generator": "merged-model",
                        "dataset": record["dataset"]} for record in ALPACA_RECORDS]


def test_empty_slice_is_an_error(options):
    options.start_index = 10
    with pytest.raises(ValueError, match="no examples"):
        evaluate_dataset(ScriptedBackend(lambda prompt: ""), "gsm8k", options)


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "nested" / "value.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"b": 2})
    assert json.loads(target.read_text()) == {"b": 2}
    assert [path.name for path in target.parent.iterdir()] == ["value.json"]
