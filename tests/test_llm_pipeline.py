"""Both LLM scripts end to end on a tiny random Llama family (transformers backend, CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import inference_llms_instruct_math_code as inference
import merge_llms_instruct_math_code as merge
from llm_helpers import save_tiny_llama, tiny_family, write_data_dir
from utils.llm.cli import inference_run, merge_members, merge_run
from utils.llm.models import BackboneMismatchError, check_backbone, resolve_model
from utils.llm.pipeline import inference_save_name, merge_save_name

pytest.importorskip("utils.engine.streaming")

COMMON = ["--backend", "transformers", "--device", "cpu", "--num_threads", "1", "--max_tokens", "4",
          "--code_timeout", "2"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llms")
    return {**tiny_family(root), "data": write_data_dir(root / "data")}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _pad(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] >= rows:
        return tensor
    return torch.cat([tensor, tensor.mean(dim=0, keepdim=True).expand(rows - tensor.shape[0], *tensor.shape[1:])])


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_inference_without_drop_uses_the_model_as_is(family, tmp_path):
    out = tmp_path / "out"
    code = inference.main(["--finetuned_model_name", str(family["ft_math"]), "--dataset_name", "gsm8k",
                           "--end_index", "2", "--data_dir", str(family["data"]), "--save_dir", str(out), *COMMON])
    assert code == 0
    folder = out / "save_gen_math_results" / "gsm8k" / "ft_math_inference_mask_0.0"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["metrics"]["num_examples"] == 2 and summary["backend"]["model_path"] == str(family["ft_math"])
    assert summary["decoding"]["max_new_tokens"] == 4 and summary["decoding"]["paper_max_tokens"] == 1024
    assert len(_records(folder / "records.jsonl")) == 2
    assert not (out / "save_models").exists()
    assert len(list((out / "save_logs" / "gsm8k" / "ft_math_inference_mask_0.0").glob("*.log"))) == 1


def test_inference_with_dare_keeps_a_correct_checkpoint(family, tmp_path):
    out = tmp_path / "out"
    inference.main(["--finetuned_model_name", str(family["ft_math"]), "--pretrained_model_name", str(family["base"]),
                    "--dataset_name", "human_eval", "--end_index", "2", "--weight_mask_rate", "0.5",
                    "--use_weight_rescale", "--keep_model", "--save_dir", str(out), *COMMON])
    name = "ft_math_inference_mask_0.5_rescale_True"
    checkpoint = out / "save_models" / "human_eval" / name
    dared, tuned = _weights(checkpoint), _weights(family["ft_math"])
    base = {key: _pad(value, tuned[key].shape[0]) for key, value in _weights(family["base"]).items()}
    assert dared["model.embed_tokens.weight"].shape == (260, 32)
    kept = []
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        delta, original = dared[key] - base[key], tuned[key] - base[key]
        survivors = delta != 0
        assert torch.allclose(delta[survivors], 2.0 * original[survivors], atol=1e-5)   # rescaled by 1 / (1 − p)
        kept.append(survivors.float().mean().item())
    assert all(0.4 < fraction < 0.6 for fraction in kept)
    samples = (out / "save_gen_codes_results" / "human_eval" / f"{name}.jsonl").read_text().splitlines()
    assert [json.loads(line)["task_id"] for line in samples] == ["HumanEval/0", "HumanEval/1"]
    summary = json.loads((out / "save_gen_codes_results" / "human_eval" / name / "summary.json").read_text())
    assert summary["config"]["dare_manifest"]["method"]["requested"] == "dare"
    assert summary["metrics"]["pass@1"] == 0.0


def test_inference_removes_the_temporary_checkpoint(family, tmp_path):
    out = tmp_path / "out"
    inference.main(["--finetuned_model_name", str(family["ft_code"]), "--pretrained_model_name", str(family["base"]),
                    "--dataset_name", "mbpp", "--end_index", "1", "--weight_mask_rate", "0.9",
                    "--mask_strategy", "magnitude", "--data_dir", str(family["data"]), "--save_dir", str(out), *COMMON])
    assert not (out / "save_models").exists()
    name = "ft_code_inference_mask_0.9_rescale_False_strategy_magnitude"
    combined = json.loads((out / "save_gen_codes_results" / "mbpp" / f"{name}.jsonl").read_text())
    assert len(combined) == 2 and len(combined[0]) == 1 and combined[1] == []


def test_wrong_backbone_is_a_clear_error(family, tmp_path, capsys):
    code_llama_like = save_tiny_llama(tmp_path / "rope_base", seed=9, rope_theta=1e6)
    status = inference.main(["--finetuned_model_name", str(family["ft_math"]), "--pretrained_model_name",
                             str(code_llama_like), "--dataset_name", "gsm8k", "--weight_mask_rate", "0.1",
                             "--data_dir", str(family["data"]), "--save_dir", str(tmp_path / "out"), *COMMON])
    assert status == 2 and "rope_theta" in capsys.readouterr().err
    report = check_backbone(str(family["ft_math"]), str(code_llama_like), allow_mismatch=True)
    assert any("rope_theta" in problem for problem in report["mismatches"])
    assert check_backbone(str(family["ft_math"]), str(family["base"]))["mismatches"] == []


def test_missing_data_fails_before_any_work(family, tmp_path, capsys):
    status = inference.main(["--finetuned_model_name", str(family["ft_math"]), "--dataset_name", "MATH",
                             "--data_dir", str(tmp_path), "--save_dir", str(tmp_path / "out"), *COMMON])
    assert status == 2 and "MATH_test.jsonl" in capsys.readouterr().err


def test_merge_task_arithmetic_weights_and_results(family, tmp_path):
    out = tmp_path / "out"
    merge.main(["--models_to_merge", str(family["ft_math"]), str(family["ft_code"]), "--model_tasks", "math", "code",
                "--pretrained_model_name", str(family["base"]), "--merging_method_name", "task_arithmetic",
                "--scaling_coefficient", "0.7", "--datasets", "gsm8k", "--end_index", "1", "--keep_model",
                "--data_dir", str(family["data"]), "--save_dir", str(out), *COMMON])
    folder = out / "save_merge_models" / "math_code" / "task_arithmetic_scaling_coefficient_0.7"
    merged, one, two = _weights(folder), _weights(family["ft_math"]), _weights(family["ft_code"])
    base = {key: _pad(value, one[key].shape[0]) for key, value in _weights(family["base"]).items()}
    for key, value in merged.items():
        expected = base[key] + 0.7 * ((one[key] - base[key]) + (two[key] - base[key]))
        assert torch.allclose(value, expected, atol=1e-6), key
    overview = json.loads((out / "save_merge_llm_results" / "math_code" /
                           "task_arithmetic_scaling_coefficient_0.7.json").read_text())
    assert set(overview["metrics"]) == {"gsm8k"} and overview["metrics"]["gsm8k"]["num_examples"] == 1
    assert overview["merge_manifest"]["method"]["requested"] == "task_arithmetic"


def test_merge_ties_matches_the_library(family, tmp_path):
    from model_merging_methods import MergeOptions, merge_state_dicts

    out = tmp_path / "out"
    merge.main(["--models_to_merge", str(family["ft_math"]), str(family["ft_code"]), "--model_tasks", "math", "code",
                "--pretrained_model_name", str(family["base"]), "--merging_method_name", "ties_merging",
                "--scaling_coefficient", "0.5", "--param_value_mask_rate", "0.7", "--datasets", "gsm8k",
                "--end_index", "1", "--keep_model", "--data_dir", str(family["data"]), "--save_dir", str(out), *COMMON])
    folder = out / "save_merge_models" / "math_code" / "ties_merging_scaling_coefficient_0.5_param_value_mask_rate_0.7"
    merged, one, two = _weights(folder), _weights(family["ft_math"]), _weights(family["ft_code"])
    base = {key: _pad(value, one[key].shape[0]) for key, value in _weights(family["base"]).items()}
    expected = merge_state_dicts("ties_merging", base, [one, two],
                                 MergeOptions(scaling_coefficient=0.5, density=0.3, ties_trim="per_tensor"))
    for key, value in merged.items():
        assert torch.allclose(value, expected[key], atol=1e-6), key
    delta = merged["model.layers.1.mlp.up_proj.weight"] - base["model.layers.1.mlp.up_proj.weight"]
    assert 0.2 < (delta != 0).float().mean().item() < 0.6          # union of two 30% keeps, sign-elected


def test_merge_dare_in_child_processes_then_evaluate_only(family, tmp_path):
    out = tmp_path / "out"
    flags = ["--models_to_merge", str(family["ft_math"]), str(family["ft_code"]), "--model_tasks", "math", "code",
             "--pretrained_model_name", str(family["base"]), "--merging_method_name", "mask_merging",
             "--mask_apply_method", "average_merging", "--weight_mask_rate", "0.3", "--use_weight_rescale",
             "--end_index", "1", "--data_dir", str(family["data"]), *COMMON]
    merge.main([*flags, "--eval_in_child", "always", "--keep_model", "--save_dir", str(out)])
    name = "mask_merging/average_merging/mask_0.3_0.3_rescale_True"
    folder = out / "save_merge_models" / "math_code" / name
    assert (folder / "merge_manifest.json").is_file()
    tokenizers = {}
    for dataset, root in (("gsm8k", "save_gen_math_results"), ("MATH", "save_gen_math_results"),
                          ("human_eval", "save_gen_codes_results"), ("mbpp", "save_gen_codes_results")):
        summary = json.loads((out / root / "math_code" / dataset / name / "summary.json").read_text())
        tokenizers[dataset] = summary["backend"]["tokenizer_path"]
        assert summary["metrics"]["num_examples"] == 1
    assert tokenizers["gsm8k"] == tokenizers["MATH"] == str(family["ft_math"])
    assert tokenizers["human_eval"] == tokenizers["mbpp"] == str(family["ft_code"])

    again = tmp_path / "again"
    merge.main([*flags, "--evaluate_only", str(folder), "--evaluate_task", "math", "--tokenizer_path",
                str(family["ft_math"]), "--save_dir", str(again)])
    first = _records(out / "save_gen_math_results" / "math_code" / "gsm8k" / name / "records.jsonl")
    second = _records(again / "save_gen_math_results" / "math_code" / "gsm8k" / name / "records.jsonl")
    assert [row["completion"] for row in first] == [row["completion"] for row in second]
    assert not (again / "save_gen_codes_results").exists()


def test_merge_needs_two_models():
    with pytest.raises(SystemExit, match="two models"):
        merge.main(["--merge_math"])
    with pytest.raises(SystemExit, match="either"):
        merge.main(["--merge_math", "--models_to_merge", "a", "b"])


def test_paper_save_names():
    args = merge.build_parser().parse_args(["--merge_instruct", "--merge_math", "--merge_code",
                                            "--merging_method_name", "mask_merging", "--weight_mask_rate", "0.1",
                                            "--use_weight_rescale", "--mask_apply_method", "task_arithmetic"])
    assert merge_save_name(merge_run(args, child_command=None), 3) == \
        "mask_merging/task_arithmetic_scaling_coefficient_1.0/mask_0.1_0.1_0.1_rescale_True"
    assert merge_members(args)[2] == "instruct_math_code"
    assert merge_members(args)[0] == ["WizardLM-13B-V1.2", "WizardMath-13B-V1.0", "llama-2-13b-code-alpaca"]
    args = inference.build_parser().parse_args(["--finetuned_model_name", "WizardCoder-Python-13B-V1.0",
                                                "--weight_mask_rate", "0.9", "--use_weight_rescale",
                                                "--weight_format", "finetuned_weight",
                                                "--wizardcoder_use_llama2_as_backbone"])
    run = inference_run(args)
    assert run.backbone_name == "Llama-2-13b-hf"
    assert inference_save_name(run.finetuned_model_name, run.dare, llama2_backbone=True) == ("WizardCoder-Python-13B-V1.0_inference_mask_0.9_rescale_True"
                                                   "_weight_format_finetuned_weight_llama_2_as_backbone")
    assert inference.build_parser().parse_args([]).weight_mask_rate == 0.0
    assert resolve_model("WizardMath-7B-V1.0") == "WizardLMTeam/WizardMath-7B-V1.0"
    with pytest.raises(FileNotFoundError, match="not a folder"):
        resolve_model("no_such_model")
