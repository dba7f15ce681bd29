"""Issue 19, item 6: LLM evaluation given a damaged run_settings.json, a prompt longer than the model's
context, and two evaluations of the same name at once."""
from __future__ import annotations

import json

import pytest

from llm_helpers import ScriptedBackend, save_tiny_llama, write_data_dir
from utils.llm.evaluation import EvalOptions, RecordsError, evaluate_dataset, result_folder
from utils.llm.pipeline import run_with_exit_status


def _reply(prompt: str) -> str:
    return "The answer is: 7"


@pytest.fixture()
def options(tmp_path):
    data = write_data_dir(tmp_path / "data")
    return EvalOptions(save_dir=str(tmp_path / "out"), save_name="m", data_dir=str(data), seed=3,
                       run_config={"arguments": {"max_tokens": None, "seed": 3, "batch_size": 8}})


@pytest.mark.parametrize("content, says", [("{not json", "is not valid JSON"), ("[1, 2]", "holds a list"),
                                           ('"text"', "holds a str"), ("", "is not valid JSON")])
def test_damaged_run_settings_is_a_one_line_error(options, capsys, content, says):
    evaluate_dataset(ScriptedBackend(_reply), "gsm8k", options)
    (result_folder(options.save_dir, "gsm8k", "m") / "run_settings.json").write_text(content)
    with pytest.raises(RecordsError, match=says):
        evaluate_dataset(ScriptedBackend(_reply), "gsm8k", options)
    assert run_with_exit_status(lambda _: evaluate_dataset(ScriptedBackend(_reply), "gsm8k", options), None) == 2
    err = capsys.readouterr().err
    assert says in err and "--restart" in err and err.count("\n") == 1


def test_a_prompt_longer_than_the_context_is_a_one_line_error(tmp_path, capsys):
    from utils.llm.generation import GenerationParams, PromptTooLongError, TransformersBackend

    folder = save_tiny_llama(tmp_path / "model", seed=3)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32}))
    backend = TransformersBackend(str(folder), batch_size=2, device="cpu", num_threads=1)
    params = GenerationParams(max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0, stop=())
    assert len(backend.generate(["short"], params)) == 1                 # fits: still generates
    with pytest.raises(PromptTooLongError, match="leaves no room to generate within the model's 32 positions"):
        backend.generate(["x" * 100, "short"], params)
    capsys.readouterr()
    assert run_with_exit_status(lambda _: backend.generate(["x" * 100], params), None) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: a prompt of") and err.count("\n") == 1 and "Traceback" not in err


class Intruder(ScriptedBackend):
    """While generating, starts a second evaluation of the same name (as a second process would)."""

    def __init__(self, options):
        super().__init__(_reply)
        self.options, self.refusal = options, None

    def generate(self, prompts, params):
        if self.refusal is None:
            try:
                evaluate_dataset(ScriptedBackend(_reply), "gsm8k", self.options)
                self.refusal = "not refused"
            except RecordsError as error:
                self.refusal = str(error)
        return super().generate(prompts, params)


def test_two_evaluations_of_the_same_name_do_not_share_the_records(options):
    intruder = Intruder(options)
    summary = evaluate_dataset(intruder, "gsm8k", options)
    assert "is being written by another evaluation" in intruder.refusal and "--save_name" in intruder.refusal
    assert summary["metrics"]["num_examples"] == 3
    records = (result_folder(options.save_dir, "gsm8k", "m") / "records.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in records) == [0, 1, 2]
    assert evaluate_dataset(ScriptedBackend(_reply), "gsm8k", options)["resumed_examples"] == 3   # lock released
