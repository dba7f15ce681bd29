"""Text generation behind one interface: vLLM (optional, GPU) or transformers (CPU or GPU).

Both backends follow vLLM's sampling semantics, which the paper used:

* ``temperature == 0`` is greedy decoding (argmax); otherwise tokens are drawn from
  softmax(logits / temperature) restricted to the smallest set whose probability mass reaches
  ``top_p`` (nucleus sampling; ``top_p = 1`` keeps every token; no top-k limit);
* generation stops at an end-of-sequence token (unless ``ignore_eos``, meant for benchmarks), after
  ``max_new_tokens`` tokens, or as soon as one of the ``stop`` strings appears in the generated text;
  the returned text ends right before the earliest stop string and never contains the prompt, the
  end-of-sequence token or other special tokens.
"""
from __future__ import annotations

import abc
import importlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from utils.cli import resolve_device

BACKEND_KINDS = ("auto", "vllm", "transformers")
HEARTBEAT_SECONDS = 30.0   # a long batch logs its progress this often

logger = logging.getLogger(__name__)


def default_threads() -> int:
    """CPU threads that do not oversubscribe a busy machine: the cores minus the 1-minute load average
    (at least 1). Oversubscribed torch threads spin on each other and run several times slower."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(round(cores - busy))))


class PromptTooLongError(ValueError):
    """A prompt longer than the model's context (max_position_embeddings): a user error, exit status 2.
    Prompts are never cut silently (a cut few-shot prompt would be another benchmark)."""


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings of one ``generate`` call (see the module docstring for their meaning)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not stop for stop in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for marker in stop:
        position = text.find(marker)
        if 0 <= position < cut:
            cut = position
    return text[:cut]


@dataclass
class GenerationStats:
    """Totals over the backend's lifetime (prompt/generated token counts, wall seconds in generate)."""

    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    calls: list[dict[str, Any]] = field(default_factory=list)


class GenerationBackend(abc.ABC):
    """A loaded model that turns prompts into completions; ``generate`` keeps the prompts' order."""

    name: str = "base"

    def __init__(self) -> None:
        self.stats = GenerationStats()

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[str]:
        """One completion per prompt, in the same order."""

    def schedule(self, prompts: Sequence[str], per_call: int) -> list[list[int]]:
        """How the evaluation groups prompts into ``generate`` calls (lists of prompt indices): here runs
        of ``per_call`` in order. Results are saved after each call, so a call is the unit of resumption."""
        return [list(range(start, min(start + per_call, len(prompts)))) for start in range(0, len(prompts), per_call)]

    def chat_prompt(self, message: str) -> str:
        """``message`` as one user turn in the model's own chat template, ready for the assistant's reply."""
        tokenizer = self.tokenizer_for_chat()
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{getattr(self, 'tokenizer_path', 'the model')}: the tokenizer has no chat template; "
                             f"use --prompt_format paper")
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)

    def tokenizer_for_chat(self) -> Any:
        raise ValueError(f"backend {self.name} has no tokenizer for chat prompts")

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Settings that identify the backend in a run summary."""

    def close(self) -> None:
        """Release the model (GPU memory included)."""


def _resolve_dtype(dtype: str, device: Any, config_dtype: Any) -> Any:
    """``auto``: float32 on CPU; on GPU the checkpoint's half dtype, float32 checkpoints -> float16
    (what vLLM's ``dtype="auto"`` did for the paper's float32 checkpoints)."""
    import torch

    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype != "auto":
        if dtype not in names:
            raise ValueError(f"dtype must be one of {['auto', *names]}, got '{dtype}'")
        return names[dtype]
    if device.type == "cpu":
        return torch.float32
    if isinstance(config_dtype, str):
        config_dtype = names.get(config_dtype)
    return config_dtype if config_dtype in (torch.float16, torch.bfloat16) else torch.float16


class _StopOnStrings:
    """Per-sequence stopping criterion: true once a stop string appears in the generated tokens.

    Only the last ``window`` generated tokens are decoded at each step (a stop string of c characters
    spans at most c tokens); the final text is cut again on the full decode, so this only decides
    when a sequence may stop early.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.prompt_length = prompt_length
        self.window = max(len(marker) for marker in stop) + 8

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        generated = input_ids[:, self.prompt_length:]
        tails = generated[:, -self.window:].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        done = [any(marker in text for marker in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _Heartbeat:
    """A stopping criterion that never stops: logs a long batch's progress every HEARTBEAT_SECONDS."""

    def __init__(self, label: str, prompt_length: int, budget: int, rows: int) -> None:
        self.label, self.prompt_length, self.budget, self.rows = label, prompt_length, budget, rows
        self.started = self.last = time.perf_counter()

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        now = time.perf_counter()
        if now - self.last >= HEARTBEAT_SECONDS:
            self.last = now
            steps = input_ids.shape[1] - self.prompt_length
            logger.info("%s: %d/%d new tokens per sequence, %.1f tokens/s (batch of %d)", self.label, steps,
                        self.budget, steps * self.rows / (now - self.started), self.rows)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class TransformersBackend(GenerationBackend):
    """Batched ``model.generate`` with left padding; prompts are sorted by length into micro-batches
    of ``batch_size`` (results are returned in the original order).

    ``num_threads`` sets torch's CPU thread count (process-wide; fewer threads than cores can be
    faster on a shared machine). Greedy results do not depend on the batch except for floating-point
    effects of padding; sampled results are reproducible for the same prompts, batch size and seed
    (the torch RNG is seeded with ``params.seed + micro-batch index`` inside a forked RNG state).
    """

    name = "transformers"

    def __init__(self, model_path: str, *, tokenizer_path: str | None = None, device: str = "auto",
                 dtype: str = "auto", batch_size: int = 8, num_threads: int | None = None) -> None:
        super().__init__()
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_path = str(model_path)
        self.tokenizer_path = str(tokenizer_path or model_path)
        self.batch_size = batch_size
        self.device = resolve_device(device)
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if self.device.type == "cpu":
            torch.set_num_threads(num_threads or default_threads())
        config = AutoConfig.from_pretrained(self.model_path)
        config_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        self.dtype = _resolve_dtype(dtype, self.device, config_dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype).to(self.device).eval()
        self.eos_ids = self._eos_ids()
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"{self.tokenizer_path}: tokenizer has neither a pad nor an end-of-sequence token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    def tokenizer_for_chat(self) -> Any:
        return self.tokenizer

    def schedule(self, prompts: Sequence[str], per_call: int) -> list[list[int]]:
        """Micro-batches of ``batch_size`` prompts, longest first (the batches ``generate`` itself forms
        for the whole list), so that saving after every batch changes no result."""
        lengths = [len(self.tokenizer(prompt)["input_ids"]) for prompt in prompts]
        order = sorted(range(len(prompts)), key=lambda index: -lengths[index])
        return [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        for source in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            for value in source if isinstance(source, (list, tuple)) else [source]:
                if value is not None and int(value) not in ids:
                    ids.append(int(value))
        return ids

    def describe(self) -> dict[str, Any]:
        import torch

        return {"backend": self.name, "model_path": self.model_path, "tokenizer_path": self.tokenizer_path,
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "batch_size": self.batch_size, "torch_threads": torch.get_num_threads()}

    def _generation_config(self, params: GenerationParams, max_new_tokens: int) -> Any:
        from transformers import GenerationConfig

        sampling = params.temperature > 0
        options: dict[str, Any] = {
            "max_new_tokens": max_new_tokens, "do_sample": sampling, "num_beams": 1,
            "pad_token_id": self.pad_id, "eos_token_id": self.eos_ids or None,
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
            "min_new_tokens": max_new_tokens if params.ignore_eos else 0,
        }
        if sampling:
            options.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        return GenerationConfig(**options)

    def _generated_length(self, tokens: list[int], ignore_eos: bool) -> int:
        """Tokens actually generated: up to the first end-of-sequence token (inclusive) or, for a
        sequence finished by a stop string, up to the padding that follows it."""
        if ignore_eos:
            return len(tokens)
        for position, token in enumerate(tokens):
            if token in self.eos_ids:
                return position + 1
            if token == self.pad_id:
                return position
        return len(tokens)

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[str]:
        import torch

        with torch.inference_mode():
            return self._generate(prompts, params)

    def _generate(self, prompts: Sequence[str], params: GenerationParams) -> list[str]:
        import torch

        start = time.perf_counter()
        encoded = [self.tokenizer(prompt)["input_ids"] for prompt in prompts]
        order = sorted(range(len(prompts)), key=lambda index: -len(encoded[index]))
        results: list[str] = [""] * len(prompts)
        generated_total = 0
        for batch_index, first in enumerate(range(0, len(order), self.batch_size)):
            members = order[first:first + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [encoded[index] for index in members]},
                                       padding=True, return_tensors="pt")
            prompt_length = batch["input_ids"].shape[1]
            budget = params.max_new_tokens
            if self.max_positions is not None:
                budget = min(budget, int(self.max_positions) - prompt_length)
            if budget < 1:
                longest = max(members, key=lambda index: len(encoded[index]))
                raise PromptTooLongError(
                    f"a prompt of {len(encoded[longest])} tokens (batched to {prompt_length}) leaves no room to "
                    f"generate within the model's {self.max_positions} positions ({self.model_path}); its start: "
                    f"{prompts[longest][:80]!r}. Finished problems are saved; use a model with a longer context, "
                    f"or leave this problem out with --start_index / --end_index")
            criteria = [_StopOnStrings(self.tokenizer, params.stop, prompt_length)] if params.stop else []
            criteria.append(_Heartbeat(f"batch of {len(members)}", prompt_length, budget, len(members)))
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(params.seed + batch_index)
                output = self.model.generate(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                    generation_config=self._generation_config(params, budget),
                    stopping_criteria=criteria,
                )
            new_tokens = output[:, prompt_length:].tolist()
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True,
                                                clean_up_tokenization_spaces=False)
            for index, tokens, text in zip(members, new_tokens, texts):
                results[index] = truncate_at_stop(text, params.stop)
                generated_total += self._generated_length(tokens, params.ignore_eos)
        seconds = time.perf_counter() - start
        prompt_tokens = sum(len(ids) for ids in encoded)
        self.stats.prompts += len(prompts)
        self.stats.prompt_tokens += prompt_tokens
        self.stats.generated_tokens += generated_total
        self.stats.seconds += seconds
        self.stats.calls.append({"prompts": len(prompts), "prompt_tokens": prompt_tokens,
                                 "generated_tokens": generated_total, "seconds": round(seconds, 3)})
        return results

    def close(self) -> None:
        self.model = None
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class VLLMBackend(GenerationBackend):
    """vLLM engine (``vllm.LLM``) with ``tensor_parallel_size`` GPUs; vLLM is imported only here.

    vLLM allows one engine per process in the versions the paper used; the merge script therefore
    evaluates each merged model in its own child process.
    """

    name = "vllm"

    def __init__(self, model_path: str, *, tokenizer_path: str | None = None, tensor_parallel_size: int = 1,
                 seed: int = 0, dtype: str = "auto", gpu_memory_utilization: float = 0.9) -> None:
        super().__init__()
        self._vllm = importlib.import_module("vllm")
        self.model_path = str(model_path)
        self.tokenizer_path = str(tokenizer_path or model_path)
        self.tensor_parallel_size = tensor_parallel_size
        self.seed = seed
        self.dtype = dtype
        self._llm = self._vllm.LLM(model=self.model_path, tokenizer=self.tokenizer_path,
                                   tensor_parallel_size=tensor_parallel_size, seed=seed, dtype=dtype,
                                   gpu_memory_utilization=gpu_memory_utilization)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model_path": self.model_path, "tokenizer_path": self.tokenizer_path,
                "tensor_parallel_size": self.tensor_parallel_size, "seed": self.seed, "dtype": self.dtype,
                "vllm_version": getattr(self._vllm, "__version__", "unknown")}

    def tokenizer_for_chat(self) -> Any:
        return self._llm.get_tokenizer()

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[str]:
        start = time.perf_counter()
        sampling = self._vllm.SamplingParams(
            n=1, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None, seed=params.seed if params.temperature > 0 else None,
            ignore_eos=params.ignore_eos)
        outputs = self._llm.generate(list(prompts), sampling)
        texts = [output.outputs[0].text for output in outputs]
        self.stats.prompts += len(prompts)
        self.stats.prompt_tokens += sum(len(output.prompt_token_ids) for output in outputs)
        self.stats.generated_tokens += sum(len(output.outputs[0].token_ids) for output in outputs)
        self.stats.seconds += time.perf_counter() - start
        return texts

    def close(self) -> None:
        self._llm = None
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def vllm_usable() -> bool:
    """True when vLLM is installed and a CUDA GPU is visible (vLLM needs one)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def resolve_backend_kind(kind: str) -> str:
    """``auto`` -> ``vllm`` when :func:`vllm_usable`, else ``transformers``; explicit kinds are checked."""
    if kind not in BACKEND_KINDS:
        raise ValueError(f"backend must be one of {BACKEND_KINDS}, got '{kind}'")
    if kind == "auto":
        return "vllm" if vllm_usable() else "transformers"
    if kind == "vllm" and not vllm_usable():
        raise RuntimeError("backend 'vllm' requested, but vLLM is not installed or no CUDA GPU is visible; "
                           "install vllm on a GPU machine or use --backend transformers")
    return kind


def make_backend(kind: str, model_path: str, *, tokenizer_path: str | None = None, tensor_parallel_size: int = 1,
                 batch_size: int = 8, device: str = "auto", dtype: str = "auto", seed: int = 0,
                 num_threads: int | None = None) -> GenerationBackend:
    """Build the backend named by ``kind`` (``auto`` | ``vllm`` | ``transformers``) on ``model_path``."""
    resolved = resolve_backend_kind(kind)
    if resolved == "vllm":
        return VLLMBackend(model_path, tokenizer_path=tokenizer_path, tensor_parallel_size=tensor_parallel_size,
                           seed=seed, dtype=dtype)
    return TransformersBackend(model_path, tokenizer_path=tokenizer_path, device=device, dtype=dtype,
                               batch_size=batch_size, num_threads=num_threads)
