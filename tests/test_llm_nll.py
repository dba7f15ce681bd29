"""--metric nll of the LLM scripts: the reference solutions' teacher-forced NLL, its files and its table rows."""
from __future__ import annotations

import json
import math

import pytest
import torch

import inference_llms_instruct_math_code as inference
import merge_llms_instruct_math_code as merge
from llm_helpers import GSM8K_RECORDS, MBPP_RECORDS, tiny_family, write_data_dir, write_jsonl
from utils.llm.benchmarks import build_prompt, fenced_python, gsm8k_response

COMMON = ["--backend", "transformers", "--device", "cpu", "--num_threads", "1", "--metric", "nll"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("nll_llms")
    return {**tiny_family(root), "data": write_data_dir(root / "data")}


def _by_hand(model_dir, prompt: str, response: str) -> tuple[float, int]:
    """Σ −log p(response token | prefix) and the token count, from the model's log-softmax one token at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    total = -sum(float(logprobs[len(prompt_ids) - 1 + k, token]) for k, token in enumerate(answer))
    return total, len(answer)


def test_inference_nll_equals_the_reference_likelihood_and_writes_no_generations(family, tmp_path):
    out = tmp_path / "out"
    code = inference.main(["--finetuned_model_name", str(family["ft_math"]), "--dataset_name", "gsm8k",
                           "--end_index", "2", "--batch_size", "2", "--data_dir", str(family["data"]),
                           "--save_dir", str(out), *COMMON])
    assert code == 0
    folder = out / "save_nll_results" / "gsm8k" / "ft_math_inference_mask_0.0"
    summary = json.loads((folder / "summary.json").read_text())
    sums = [_by_hand(family["ft_math"], build_prompt("gsm8k", r), gsm8k_response(r["answer"])) for r in GSM8K_RECORDS[:2]]
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    assert summary["metrics"]["answer_nll_per_token"] == pytest.approx(expected, rel=1e-4)
    assert summary["metrics"]["answer_tokens"] == sum(n for _, n in sums) and summary["metric_kind"] == "nll"
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    assert [r["nll_per_token"] for r in records] == pytest.approx([s / n for s, n in sums], rel=1e-4)
    assert not (out / "save_gen_math_results").exists()
    # a random model finds the references about as likely as uniform over its 259 tokens, not much better
    assert 0.5 * math.log(259) < expected < 2 * math.log(259)

    from utils.aggregation.collect import collect
    rows = [r for r in collect([out]).rows if r["is_main"]]
    assert [(r["metric"], r["task"]) for r in rows] == [("answer_nll_per_token", "gsm8k")]
    assert rows[0]["value"] == pytest.approx(expected, rel=1e-6)


def test_merge_script_scores_each_task_with_nll(family, tmp_path):
    out = tmp_path / "out"
    merge.main(["--models_to_merge", str(family["ft_math"]), str(family["ft_code"]), "--model_tasks", "math", "code",
                "--pretrained_model_name", str(family["base"]), "--merging_method_name", "task_arithmetic",
                "--scaling_coefficient", "0.5", "--end_index", "1", "--data_dir", str(family["data"]),
                "--save_dir", str(out), *COMMON])
    overviews = list((out / "save_merge_llm_results").rglob("*.json"))
    assert len(overviews) == 1
    metrics = json.loads(overviews[0].read_text())["metrics"]
    assert set(metrics) >= {"gsm8k", "mbpp"}
    assert all(entry["num_examples"] == 1 and entry["answer_nll_per_token"] > 0 for entry in metrics.values())
    summaries = list((out / "save_nll_results").rglob("summary.json"))
    assert {json.loads(p.read_text())["dataset"] for p in summaries} == set(metrics)


def test_code_references_are_fenced_code():
    assert fenced_python(MBPP_RECORDS[0]["code"]) == "```python\ndef add(a, b):\n    return a + b\n```"


def test_a_record_without_its_reference_is_a_one_line_refusal(family, tmp_path, capsys):
    data = tmp_path / "data"
    write_jsonl(data / "mbpp.test.jsonl", [{k: v for k, v in MBPP_RECORDS[0].items() if k != "code"}])
    status = inference.main(["--finetuned_model_name", str(family["ft_math"]), "--dataset_name", "mbpp",
                             "--data_dir", str(data), "--save_dir", str(tmp_path / "out"), *COMMON])
    assert status == 2
    assert "mbpp: record 11 has no field 'code'" in capsys.readouterr().err
