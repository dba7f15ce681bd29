"""The benchmark registry (one declaration + its YAML per benchmark) and the original's result names."""
from __future__ import annotations

import json

import pytest

import inference_llms_instruct_math_code as inference
import merge_llms_instruct_math_code as merge
from model_merging_methods import DareOptions
from llm_helpers import ScriptedBackend
from utils.llm import benchmarks, evaluation
from utils.llm.benchmarks import BENCHMARKS, Benchmark, DataLocation, get_benchmark, load_dataset
from utils.llm.data import DatasetSource, Example
from utils.llm.evaluation import EvalOptions, evaluate_dataset, result_folder
from utils.llm.pipeline import MergeRun, inference_save_name, merge_save_name
from utils.llm.prompts import field_input, load_task_config


def test_registry_matches_the_yaml_and_the_command_lines():
    config = load_task_config()
    assert list(BENCHMARKS) == ["alpaca_eval", "gsm8k", "MATH", "human_eval", "mbpp"]
    assert set(BENCHMARKS) == set(config["datasets"])
    assert {dataset for group in config["task_datasets"].values() for dataset in group} == set(BENCHMARKS)
    for parser, flag in ((inference.build_parser(), "dataset_name"), (merge.build_parser(), "datasets")):
        action = next(action for action in parser._actions if action.dest == flag)
        assert list(action.choices) == list(BENCHMARKS)
    roots = {name: benchmark.result_root for name, benchmark in BENCHMARKS.items()}
    assert roots == {"alpaca_eval": "save_gen_instruct_responses_results", "gsm8k": "save_gen_math_results",
                     "MATH": "save_gen_math_results", "human_eval": "save_gen_codes_results",
                     "mbpp": "save_gen_codes_results"}
    with pytest.raises(ValueError, match="unknown dataset 'glue'; known: alpaca_eval, gsm8k"):
        get_benchmark("glue")


def _echo_loader(location: DataLocation):
    records = [({"text": "2 + 2"}, "4"), ({"text": "3 + 3"}, "6")]
    examples = [Example(index=i, task_id=f"echo/{i}", record=record, gold=gold)
                for i, (record, gold) in enumerate(records)]
    return examples, DatasetSource("echo", "inline", None, len(examples))


def _echo_score(examples, generations, context):
    return [{"extracted": generation.strip(), "gold": example.gold, "correct": generation.strip() == example.gold}
            for example, generation in zip(examples, generations)]


def test_a_new_benchmark_is_one_declaration_plus_its_yaml(tmp_path, monkeypatch):
    echo = Benchmark("echo", load=_echo_loader, prompt_input=lambda record, config: field_input("echo", record, config),
                     score=_echo_score, write_standard=lambda *args: None, result_root="save_gen_echo_results",
                     metric="accuracy")
    config = load_task_config()
    config["templates"]["echo"] = "Q: {instruction} A:"
    config["datasets"]["echo"] = {"template": "echo", "field": "text", "temperature": 0.0, "top_p": 1.0,
                                  "max_tokens": 5, "stop": ["\n"], "prompts_per_call": 1}
    monkeypatch.setitem(BENCHMARKS, "echo", echo)
    monkeypatch.setattr(evaluation, "load_task_config", lambda: config)
    monkeypatch.setattr(benchmarks, "load_task_config", lambda: config)

    backend = ScriptedBackend(lambda prompt: " 4" if "2 + 2" in prompt else " 5")
    options = EvalOptions(save_dir=str(tmp_path), save_name="m", tasks="toy")
    summary = evaluate_dataset(backend, "echo", options)
    assert summary["metrics"] == {"num_examples": 2, "accuracy": 0.5, "num_correct": 1}
    assert summary["prompt_template"] == "Q: {instruction} A:" and summary["code_sandbox"] is None
    assert backend.params[0].max_new_tokens == 5 and backend.params[0].stop == ("\n",)
    folder = result_folder(tmp_path, "echo", "m", "toy")
    assert folder == tmp_path / "save_gen_echo_results" / "toy" / "echo" / "m"
    rows = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["Q: 2 + 2 A:", "Q: 3 + 3 A:"]
    assert load_dataset("echo")[0][1].task_id == "echo/1"


@pytest.mark.parametrize("rate, rescale, strategy, weight_format, llama2, expected", [
    (0.0, False, "random", "delta_weight", True, "M_inference_mask_0.0"),
    (0.9, False, "random", "delta_weight", False, "M_inference_mask_0.9_rescale_False"),
    (0.9, True, "magnitude", "finetuned_weight", True,
     "M_inference_mask_0.9_rescale_True_strategy_magnitude_weight_format_finetuned_weight_llama_2_as_backbone"),
])
def test_inference_save_names_as_the_original(rate, rescale, strategy, weight_format, llama2, expected):
    dare = DareOptions(drop_rate=rate, rescale=rescale, strategy=strategy, weight_format=weight_format)
    assert inference_save_name("models/M/", dare, llama2_backbone=llama2) == expected


@pytest.mark.parametrize("method, apply, dare, expected", [
    ("average_merging", "average_merging", DareOptions(drop_rate=0.5), "average_merging"),
    ("task_arithmetic", "average_merging", DareOptions(), "task_arithmetic_scaling_coefficient_0.3"),
    ("ties_merging", "average_merging", DareOptions(),
     "ties_merging_scaling_coefficient_0.3_param_value_mask_rate_0.8"),
    ("mask_merging", "ties_merging", DareOptions(drop_rate=0.0, rescale=False),
     "mask_merging/ties_merging_scaling_coefficient_0.3_param_value_mask_rate_0.8/mask_0.0_0.0_rescale_False"),
    ("mask_merging", "average_merging", DareOptions(drop_rate=0.2, strategy="magnitude",
                                                    weight_format="finetuned_weight"),
     "mask_merging/average_merging/mask_0.2_0.2_rescale_True_strategy_magnitude_weight_format_finetuned_weight"),
])
def test_merge_save_names_as_the_original(method, apply, dare, expected):
    run = MergeRun(models=["a", "b"], tasks=[None, None], label="a_b", groups=[], evaluation=EvalOptions(),
                   method=method, mask_apply_method=apply, scaling_coefficient=0.3, dare=dare)
    assert merge_save_name(run, 2) == expected
