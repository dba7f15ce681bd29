"""Generation backends: transformers on a tiny random Llama; the vLLM path against a stand-in module."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from llm_helpers import save_tiny_llama
from utils.llm.generation import (GenerationParams, TransformersBackend, VLLMBackend, _StopOnStrings, make_backend,
                              resolve_backend_kind, truncate_at_stop)

PROMPTS = ["Question: what is 2 + 2?", "Hi", "A longer prompt with several more words in it, to force padding."]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    folder = save_tiny_llama(tmp_path_factory.mktemp("gen") / "model", seed=3)
    return TransformersBackend(str(folder), batch_size=2, device="cpu", num_threads=1)


def test_truncate_at_stop():
    assert truncate_at_stop("abc Response: x Instruction", ["Instruction", "Response"]) == "abc "
    assert truncate_at_stop("no markers", ["Instruction"]) == "no markers"
    assert truncate_at_stop("Instruction: y", ["Instruction:", "Instruction"]) == ""


def test_params_validation():
    with pytest.raises(ValueError):
        GenerationParams(max_new_tokens=0)
    with pytest.raises(ValueError):
        GenerationParams(max_new_tokens=1, top_p=0.0)
    with pytest.raises(ValueError):
        GenerationParams(max_new_tokens=1, stop=("",))


def test_greedy_is_independent_of_batching(backend):
    params = GenerationParams(max_new_tokens=12)
    batched = backend.generate(PROMPTS, params)
    single = [backend.generate([prompt], params)[0] for prompt in PROMPTS]
    assert batched == single
    assert all(len(text) > 0 for text in batched)
    assert backend.describe()["dtype"] == "float32" and backend.describe()["batch_size"] == 2


def test_stop_string_cuts_and_stops_early(backend):
    free = backend.generate([PROMPTS[0]], GenerationParams(max_new_tokens=24))[0]
    marker = next(free[i:i + 2] for i in range(3, len(free) - 1) if free[i:i + 2].isascii()
                  and free[i:i + 2].isprintable() and free[i:i + 2].strip())
    tokens_before = backend.stats.generated_tokens
    stopped = backend.generate([PROMPTS[0]], GenerationParams(max_new_tokens=24, stop=(marker,)))[0]
    assert stopped == truncate_at_stop(free, [marker])
    assert marker not in stopped
    assert backend.stats.generated_tokens - tokens_before < 24


def test_stop_criterion_per_sequence(backend):
    tokenizer = backend.tokenizer
    rows = [tokenizer("ab Response")["input_ids"], tokenizer("ab Respons_")["input_ids"]]
    ids = torch.tensor(rows)
    done = _StopOnStrings(tokenizer, ["Response"], prompt_length=2)(ids, None)
    assert done.tolist() == [True, False]


def test_ignore_eos_generates_every_token(backend):
    before = backend.stats.generated_tokens
    backend.generate(PROMPTS, GenerationParams(max_new_tokens=7, ignore_eos=True))
    assert backend.stats.generated_tokens - before == 3 * 7


def test_sampling_is_seeded(backend):
    first = backend.generate(PROMPTS[:2], GenerationParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5))
    again = backend.generate(PROMPTS[:2], GenerationParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5))
    other = backend.generate(PROMPTS[:2], GenerationParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=6))
    assert first == again and first != other


def test_auto_backend_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None if name == "vllm" else object())
    assert resolve_backend_kind("auto") == "transformers"
    with pytest.raises(RuntimeError, match="vLLM"):
        resolve_backend_kind("vllm")
    with pytest.raises(ValueError):
        resolve_backend_kind("tgi")


class _FakeOutput:
    def __init__(self, prompt: str, text: str):
        self.prompt_token_ids = list(range(len(prompt.split())))
        self.outputs = [types.SimpleNamespace(text=text, token_ids=[0] * len(text.split()))]


def test_vllm_backend_with_stand_in_module(monkeypatch):
    calls = {}

    class LLM:
        def __init__(self, **kwargs):
            calls["engine"] = kwargs

        def generate(self, prompts, sampling):
            calls["sampling"] = sampling
            return [_FakeOutput(prompt, f"answer {index}") for index, prompt in enumerate(prompts)]

    def sampling_params(**kwargs):
        return kwargs

    fake = types.SimpleNamespace(LLM=LLM, SamplingParams=sampling_params, __version__="0.0-test")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr("utils.llm.generation.vllm_usable", lambda: True)
    backend = make_backend("auto", "some/model", tensor_parallel_size=2, seed=7)
    assert isinstance(backend, VLLMBackend)
    texts = backend.generate(["a b", "c"], GenerationParams(max_new_tokens=5, stop=("Response",)))
    assert texts == ["answer 0", "answer 1"]
    assert calls["engine"]["tensor_parallel_size"] == 2 and calls["engine"]["seed"] == 7
    assert calls["sampling"] == {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 5, "stop": ["Response"],
                                 "seed": None, "ignore_eos": False}
    assert backend.stats.generated_tokens == 4 and backend.describe()["vllm_version"] == "0.0-test"
