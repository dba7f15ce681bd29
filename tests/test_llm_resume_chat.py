"""Evaluation that survives interruption (records appended per call, resume, --restart) and chat prompts."""
from __future__ import annotations

import json
import os
import signal

import pytest

from llm_helpers import GSM8K_RECORDS, ScriptedBackend, build_tokenizer, write_data_dir
from utils.llm.benchmarks import get_benchmark
from utils.llm.evaluation import EvalOptions, RecordsError, check_datasets, evaluate_dataset, result_folder
from utils.llm.pipeline import prompt_suffix, run_with_exit_status, sigterm_as_interrupt
from utils.llm.prompts import load_task_config
from utils.llm.scoring import extract_gsm8k_flexible, extract_math_flexible, fenced_code

ANSWERS = {"Tom has": "3 + 4 = 7. The answer is: 7", "A shop": "The answer is: 2,400 pens",
           "The temperature": "It is -3 now. The answer is: -3"}


def _reply(prompt: str) -> str:
    return next(value for key, value in ANSWERS.items() if key in prompt)


class OneByOne(ScriptedBackend):
    """Generates one prompt per call; raises KeyboardInterrupt on call number ``fail_at`` (1-based)."""

    def __init__(self, reply, fail_at: int | None = None):
        super().__init__(reply)
        self.fail_at, self.calls, self.seen = fail_at, 0, []

    def schedule(self, prompts, per_call):
        return [[index] for index in range(len(prompts))]

    def generate(self, prompts, params):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        self.seen.extend(prompts)
        return super().generate(prompts, params)


@pytest.fixture()
def options(tmp_path):
    data = write_data_dir(tmp_path / "data")
    return EvalOptions(save_dir=str(tmp_path / "out"), save_name="m", data_dir=str(data), seed=3,
                       run_config={"arguments": {"max_tokens": None, "seed": 3, "batch_size": 8}})


def _lines(options):
    path = result_folder(options.save_dir, "gsm8k", "m") / "records.jsonl"
    return path, [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_interrupted_run_resumes_where_it_stopped(options, tmp_path):
    reference = evaluate_dataset(OneByOne(_reply), "gsm8k", EvalOptions(**{**options.__dict__,
                                                                           "save_dir": str(tmp_path / "ref")}))
    with pytest.raises(KeyboardInterrupt):
        evaluate_dataset(OneByOne(_reply, fail_at=3), "gsm8k", options)
    path, rows = _lines(options)
    assert [row["index"] for row in rows] == [0, 1]          # the two finished calls were saved
    resumed = OneByOne(_reply)
    summary = evaluate_dataset(resumed, "gsm8k", options)
    assert len(resumed.seen) == 1 and "temperature" in resumed.seen[0]   # only the missing problem
    assert summary["resumed_examples"] == 2
    assert summary["metrics"] == reference["metrics"] == {"num_examples": 3, "accuracy": 1.0, "num_correct": 3,
                                                          "num_invalid": 0}
    ref_rows = [json.loads(line) for line in (result_folder(str(tmp_path / "ref"), "gsm8k", "m")
                                              / "records.jsonl").read_text().splitlines()]
    assert _lines(options)[1] == ref_rows


def test_restart_discards_and_different_settings_are_refused(options):
    evaluate_dataset(OneByOne(_reply), "gsm8k", options)
    options.max_tokens = 7
    options.run_config = {"arguments": {"max_tokens": 7, "seed": 3, "batch_size": 8}}
    with pytest.raises(RecordsError, match="max_tokens"):
        evaluate_dataset(OneByOne(_reply), "gsm8k", options)
    # the same refusal comes from the checks the entry scripts run before torch and the model load
    with pytest.raises(RecordsError, match="--max_tokens = None, this run has 7"):
        check_datasets(["gsm8k"], options)
    options.resume = False
    assert check_datasets(["gsm8k"], options) == {"gsm8k": 3}     # --restart: nothing to compare
    again = OneByOne(_reply)
    evaluate_dataset(again, "gsm8k", options)
    assert len(again.seen) == 3
    # batch size and slicing do not affect records: a resume with another batch size regenerates nothing
    options.resume = True
    options.run_config = {"arguments": {"max_tokens": 7, "seed": 3, "batch_size": 2}}
    none = OneByOne(_reply)
    assert evaluate_dataset(none, "gsm8k", options)["resumed_examples"] == 3 and none.seen == []


def test_torn_last_line_is_regenerated_and_damage_elsewhere_refused(options, caplog):
    with pytest.raises(KeyboardInterrupt):
        evaluate_dataset(OneByOne(_reply, fail_at=3), "gsm8k", options)
    path, rows = _lines(options)
    path.write_text(path.read_text() + '{"index": 2, "task_id": "2", "prom', encoding="utf-8")
    backend = OneByOne(_reply)
    summary = evaluate_dataset(backend, "gsm8k", options)
    assert "torn last line" in caplog.text and len(backend.seen) == 1 and summary["metrics"]["num_correct"] == 3
    text = path.read_text().splitlines()
    path.write_text("\n".join([text[0], "garbage", *text[1:]]) + "\n")
    with pytest.raises(RecordsError, match="line 2"):
        evaluate_dataset(OneByOne(_reply), "gsm8k", options)


def test_sigterm_becomes_an_interrupt_and_exit_status_130():
    def job(_):
        os.kill(os.getpid(), signal.SIGTERM)
    assert run_with_exit_status(job, None) == 143
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_flexible_answer_forms_and_fenced_code():
    assert extract_gsm8k_flexible("3 + 4 = 7\n#### 7") == 7
    assert extract_gsm8k_flexible("So the final answer is 1,200 pens.") == 1200
    assert extract_gsm8k_flexible("total = \\boxed{42}") == 42
    assert extract_gsm8k_flexible("first 5 then 6") == 6
    assert extract_gsm8k_flexible("The answer is: 9, not #### 3") == 9       # the paper's rule comes first
    assert extract_gsm8k_flexible("no number") is None
    assert extract_math_flexible("hence $\\boxed{\\frac{3}{4}}$") == "\\frac{3}{4}"
    assert fenced_code("Sure!\n```python\ndef f(x):\n\treturn x\n```\nDone") == "def f(x):\n    return x"
    assert fenced_code("```\nprint(1)\n") == "print(1)"
    assert fenced_code("def g():\n    pass") == "def g():\n    pass"


class ChatBackend(ScriptedBackend):
    def __init__(self, reply):
        super().__init__(reply)
        self.tokenizer = build_tokenizer(with_pad=True)
        self.tokenizer.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")

    def tokenizer_for_chat(self):
        return self.tokenizer


def test_chat_prompts_scores_and_names(options):
    options.prompt_format, options.answer_extraction = "chat", "flexible"
    answers = {"Tom has": "3 + 4 = 7\n#### 7", "A shop": "It sells \\boxed{2400}", "The temperature": "Now -3."}
    backend = ChatBackend(lambda prompt: next(v for k, v in answers.items() if k in prompt))
    summary = evaluate_dataset(backend, "gsm8k", options)
    assert summary["metrics"]["num_correct"] == 3 and backend.params[0].stop == ()
    path, rows = _lines(options)
    instruction = load_task_config()["chat"]["instructions"]["gsm8k"]
    expected = instruction.replace("{input}", GSM8K_RECORDS[0]["question"])
    assert rows[0]["prompt"] == f"<|user|>{expected}<|end|><|assistant|>"
    assert prompt_suffix(options) == "_prompt_chat"
    assert prompt_suffix(EvalOptions()) == ""
    assert prompt_suffix(EvalOptions(prompt_format="chat", answer_extraction="paper")) == "_prompt_chat_extract_paper"


def test_chat_code_is_taken_from_the_fence(options):
    options.prompt_format = "chat"
    reply = ("Here is the function:\n```python\ndef add(a, b):\n    return a + b\n```\n"
             "if __name__ == '__main__': print(add(1, 2))")
    backend = ChatBackend(lambda prompt: reply if "add two" in prompt else "```python\ndef square(x):\n    return x\n```")
    summary = evaluate_dataset(backend, "mbpp", options)
    assert summary["metrics"]["pass@1"] == 0.5
    message = get_benchmark("mbpp").chat_message({"task_id": 11, "text": "Add.", "test_list": ["assert f(1) == 1"]})
    assert "```python code block" in message and "assert f(1) == 1" in message


def test_human_eval_partial_run_writes_its_problem_subset(options):
    options.start_index, options.end_index = 0, 2
    evaluate_dataset(ScriptedBackend(lambda prompt: "    return None\n"), "human_eval", options)
    folder = result_folder(options.save_dir, "human_eval", "m")
    samples = [json.loads(line) for line in folder.with_name("m.jsonl").read_text().splitlines()]
    problems = [json.loads(line) for line in folder.with_name("m_problems.jsonl").read_text().splitlines()]
    # string-sorted task ids, as the original: HumanEval/0, HumanEval/1 are the first two
    assert [s["task_id"] for s in samples] == [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1"]
    assert set(problems[0]) >= {"prompt", "test", "entry_point"}
