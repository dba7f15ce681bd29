"""Prompts and decoding exactly as the original; data loaders, slices and their errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_helpers import ALPACA_RECORDS, GSM8K_RECORDS, MBPP_RECORDS, write_data_dir, write_jsonl
from utils.llm.benchmarks import build_prompt, load_dataset
from utils.llm.data import load_alpaca_eval, load_human_eval, resolve_data_dir, slice_examples
from utils.llm.models import model_entry
from utils.llm.prompts import generation_params, load_task_config, mbpp_input, task_datasets

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "math_code"

# The original's strings, written out independently of configs/llm_tasks.yaml.
MATH_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n### Instruction:\n{q}\n\n### Response: Let's think step by step.")
CODE_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n\n### Instruction:\nCreate a Python script for this problem:\n{q}\n\n### Response:")
CHAT_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
               "detailed, and polite answers to the user's questions. USER: {q} ASSISTANT:")


def test_math_and_chat_prompts():
    record = {"question": "What is 2 + {x}?", "instruction": "Solve $x$."}
    assert build_prompt("gsm8k", record) == MATH_PROMPT.format(q="What is 2 + {x}?")
    assert build_prompt("MATH", record) == MATH_PROMPT.format(q="Solve $x$.")
    assert build_prompt("alpaca_eval", {"instruction": "Hi {there}"}) == CHAT_PROMPT.format(q="Hi {there}")
    with pytest.raises(KeyError, match="question"):
        build_prompt("gsm8k", {"instruction": "x"})


def test_code_prompts_tabs_and_mbpp_493():
    human = {"prompt": "def f(x):\n    \"\"\"Doc.\"\"\"\n        pass\n"}
    assert build_prompt("human_eval", human) == CODE_PROMPT.format(q="def f(x):\n\t\"\"\"Doc.\"\"\"\n\t\tpass\n")
    mbpp = dict(MBPP_RECORDS[0])
    expected_input = ("\nWrite a function to add two numbers.\nTest examples:\nassert add(1, 2) == 3"
                      "\nassert add(0, 0) == 0\nassert add(-1, 1) == 0")
    assert mbpp_input(mbpp, load_task_config()) == expected_input
    assert build_prompt("mbpp", mbpp) == CODE_PROMPT.format(q=expected_input)
    long_task = {"task_id": 493, "text": "Hexagons.",
                 "test_list": ["assert calculate_polygons(1,1,4,4,3)==" + "x" * 50]}
    assert mbpp_input(long_task, load_task_config()) == \
        "\nHexagons.\nTest examples:\ncalculate_polygons(startx, starty, endx, endy, radius)"


def test_decoding_as_the_paper():
    stops = ("Instruction:", "Instruction", "Response:", "Response")
    expected = {"alpaca_eval": (2048, (), 1), "gsm8k": (1024, stops, 60), "MATH": (2048, stops, 50),
                "human_eval": (2048, (), 1), "mbpp": (2048, (), 1)}
    config = load_task_config()
    for dataset, (max_tokens, stop, per_call) in expected.items():
        params = generation_params(dataset)
        assert (params.max_new_tokens, params.stop, params.temperature, params.top_p) == (max_tokens, stop, 0.0, 1.0)
        assert config["datasets"][dataset]["prompts_per_call"] == per_call
    assert generation_params("gsm8k", max_tokens=7, seed=3).max_new_tokens == 7
    assert generation_params("gsm8k", seed=3).seed == 3


def test_task_and_model_tables():
    assert task_datasets("math") == ["gsm8k", "MATH"]
    assert task_datasets("code") == ["human_eval", "mbpp"]
    assert task_datasets("instruct") == ["alpaca_eval"]
    entry = model_entry("WizardMath-13B-V1.0")
    assert entry.backbone == "Llama-2-13b-hf" and entry.task == "math" and entry.hub_id.endswith("WizardMath-13B-V1.0")
    assert model_entry("WizardCoder-Python-13B-V1.0").backbone == "CodeLlama-13b-Python-hf"
    assert model_entry("not-a-model") is None
    merge_models = load_task_config()["merge_task_models"]
    assert {model_entry(name).backbone for name in merge_models.values()} == {"Llama-2-13b-hf"}


def test_loaders_from_folder(tmp_path):
    folder = write_data_dir(tmp_path / "data")
    gsm8k, source = load_dataset("gsm8k", data_dir=folder)
    assert [example.gold for example in gsm8k] == [7, 2400, -3]
    assert source.num_total == 3 and len(source.sha256) == 64
    math, _ = load_dataset("MATH", data_dir=folder)
    assert [example.gold for example in math] == ["\\frac{3}{4}", "4"]
    assert math[0].task_id == "fixture_0"
    mbpp, _ = load_dataset("mbpp", data_dir=folder)
    assert [example.task_id for example in mbpp] == ["11", "12"] and mbpp[1].gold == MBPP_RECORDS[1]["test_list"]
    assert [example.gold for example in slice_examples(gsm8k, 1, 2)] == [2400]
    assert [example.index for example in slice_examples(gsm8k, 1)] == [1, 2]
    with pytest.raises(ValueError):
        slice_examples(gsm8k, -1)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    folder = write_data_dir(tmp_path / "env_data")
    monkeypatch.setenv("MATH_CODE_DATA_DIR", str(folder))
    assert resolve_data_dir(None) == folder
    assert len(load_dataset("gsm8k")[0]) == len(GSM8K_RECORDS)
    monkeypatch.delenv("MATH_CODE_DATA_DIR")
    assert resolve_data_dir(None) == Path("math_code_data")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="MATH_test.jsonl"):
        load_dataset("MATH", data_dir=tmp_path)
    write_jsonl(tmp_path / "gsm8k_test.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(ValueError, match="record 0"):
        load_dataset("gsm8k", data_dir=tmp_path)
    (tmp_path / "mbpp.test.jsonl").write_text('{"task_id": 11}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="mbpp.test.jsonl:2"):
        load_dataset("mbpp", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("glue", data_dir=tmp_path)


def test_human_eval_order_as_original():
    examples, source = load_human_eval()
    assert source.num_total == 164
    assert [example.task_id for example in examples[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/10"]
    assert examples[0].record["entry_point"] == "has_close_elements"


def test_alpaca_eval_local_file(tmp_path, monkeypatch):
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(ALPACA_RECORDS), encoding="utf-8")
    examples, source = load_alpaca_eval(path)
    assert [example.record["dataset"] for example in examples] == ["vicuna", "koala"]
    monkeypatch.setenv("ALPACA_EVAL_PATH", str(path))
    assert len(load_alpaca_eval()[0]) == 2
    monkeypatch.setenv("ALPACA_EVAL_PATH", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_alpaca_eval()


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k_test.jsonl").is_file(), reason="shared GSM8K/MBPP copies not present")
def test_shared_data_files():
    gsm8k, _ = load_dataset("gsm8k", data_dir=SHARED_DATA)
    mbpp, _ = load_dataset("mbpp", data_dir=SHARED_DATA)
    assert len(gsm8k) == 1319 and gsm8k[0].gold == 18
    assert len(mbpp) == 500 and mbpp[0].task_id == "11" and mbpp[-1].task_id == "510"
    assert all(example.index == int(example.task_id) - 11 for example in mbpp)
    assert sum(example.gold < 0 for example in gsm8k) == 2

