"""Teacher-forced answer NLL: how likely a model finds a benchmark's reference solution (``--metric nll``).

For each problem the prompt is the one the generation metric sends (``--prompt_format chat``: the model's
chat template around ``chat.instructions.<dataset>``; ``paper``: the paper's template text) and the response
is the benchmark's reference (``Benchmark.reference``: GSM8K's solution ending in ``The answer is: N``,
MATH's solution, MBPP's reference code and HumanEval's prompt + canonical solution in a python fence,
AlpacaEval's reference output). The metric is

    NLL = Σ_problems Σ_response tokens −log p(token | prefix) / number of response tokens   (natural log)

a single forward pass per batch, no sampling. It moves at sizes where exact match and pass@1 sit at zero
(135M parameters), so drop-rate curves and merges can be compared there; lower is better.

Files: ``<save_dir>/save_nll_results/[<tasks>/]<dataset>/<save_name>/`` holds ``records.jsonl`` (index,
task_id, response tokens, NLL per token of the problem) and ``summary.json`` (metrics
``answer_nll_per_token``, ``answer_tokens``, ``num_examples``; the resolved configuration, data checksum and
versions), both written atomically; the aggregation reads the summary like the generation metrics'.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

NLL_ROOT = "save_nll_results"
METRIC = "answer_nll_per_token"


class MissingReferenceError(ValueError):
    """A benchmark or record without the reference response --metric nll scores (bad input: exit status 2)."""


def nll_folder(save_dir: str | os.PathLike, dataset: str, save_name: str, tasks: str | None = None) -> Path:
    base = Path(save_dir) / NLL_ROOT
    return (base / tasks if tasks else base) / dataset / save_name


def encode_pair(tokenizer, prompt: str, response: str, *, chat: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response and labels with the prompt masked (−100). ``chat``: both turns through
    the tokenizer's chat template; else the raw prompt text followed by the response and the EOS token."""
    if chat:
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        full = _ids(tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                  tokenize=True))
        if full[:len(prompt_ids)] == prompt_ids:
            return full, [-100] * len(prompt_ids) + full[len(prompt_ids):]
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
    # templates that rewrite the prompt part (and the paper format): prompt, then the response tokens
    full = list(prompt_ids) + tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return full, [-100] * len(prompt_ids) + full[len(prompt_ids):]


def _ids(value) -> list[int]:
    if isinstance(value, dict) or hasattr(value, "keys"):
        value = value["input_ids"]
    return list(value)


def answer_nll(model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 8, device: str = "cpu",
               chat: bool = True) -> dict[str, Any]:
    """NLL per response token over ``pairs`` (prompt, reference response), the per-example means and counts."""
    import torch

    model.eval()
    total, tokens, per_example, counts = 0.0, 0, [], []
    encoded = [encode_pair(tokenizer, p, r, chat=chat) for p, r in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # longest first: fewer pad tokens per batch, and an out-of-memory shows at the first batch
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: dict[int, tuple[float, int]] = {}
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = [encoded[i] for i in order[start:start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk], device=device)
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk], device=device)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk], device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
            valid = target != -100
            losses = (losses * valid).sum(dim=1)
            for row, index in enumerate(order[start:start + batch_size]):
                results[index] = (float(losses[row]), int(valid[row].sum()))
    for index in range(len(encoded)):
        loss, count = results[index]
        per_example.append(loss / max(count, 1))
        counts.append(count)
        total += loss
        tokens += count
    return {"nll_per_token": total / max(tokens, 1), "tokens": tokens, "examples": len(pairs),
            "per_example": per_example, "per_example_tokens": counts}


def reference_pairs(dataset: str, examples: Sequence, config: dict, *, chat: bool = True) -> list[tuple[str, str]]:
    """(prompt, reference response) per example; MissingReferenceError naming the record without one."""
    from utils.llm.benchmarks import get_benchmark

    benchmark = get_benchmark(dataset)
    if benchmark.reference is None:
        raise MissingReferenceError(f"{dataset}: no reference responses declared (--metric nll)")
    pairs = []
    for example in examples:
        try:
            response = benchmark.reference(example.record)
        except KeyError as error:
            raise MissingReferenceError(f"{dataset}: record {example.task_id} has no field {error} (its reference response "
                             f"for --metric nll)") from None
        prompt = benchmark.chat_message(example.record, config) if chat else benchmark.prompt(example.record, config)
        pairs.append((prompt, response))
    return pairs


def evaluate_nll(model_path: str, datasets: Sequence[str], options, *, tokenizer_path: str | None = None) -> list[dict]:
    """Load ``model_path`` once with transformers and write the answer-NLL result folder of each dataset."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.llm.evaluation import _selected_examples
    from utils.llm.prompts import load_task_config
    from utils.records import library_versions, write_json_atomic, write_jsonl_atomic

    device = options.device if options.device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.float32 if device == "cpu" else torch.bfloat16, "float32": torch.float32,
             "float16": torch.float16, "bfloat16": torch.bfloat16}[options.dtype]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    config = load_task_config()
    chat = options.prompt_format == "chat"
    summaries = []
    for dataset in datasets:
        examples, source = _selected_examples(dataset, options)
        pairs = reference_pairs(dataset, examples, config, chat=chat)
        started = time.perf_counter()
        scored = answer_nll(model, tokenizer, pairs, batch_size=options.batch_size, device=device, chat=chat)
        seconds = time.perf_counter() - started
        folder = nll_folder(options.save_dir, dataset, options.save_name, options.tasks)
        write_jsonl_atomic(folder / "records.jsonl", [
            {"index": e.index, "task_id": e.task_id, "response_tokens": n, "nll_per_token": v}
            for e, n, v in zip(examples, scored["per_example_tokens"], scored["per_example"])])
        summary = {"dataset": dataset, "metric_kind": "nll",
                   "metrics": {METRIC: scored["nll_per_token"], "answer_tokens": scored["tokens"],
                               "num_examples": len(examples)},
                   "save_name": options.save_name, "tasks": options.tasks, "start_index": options.start_index,
                   "end_index": options.end_index, "seed": options.seed, "prompt_format": options.prompt_format,
                   "backend": {"kind": "transformers", "device": device, "dtype": str(dtype).replace("torch.", ""),
                               "batch_size": options.batch_size},
                   "seconds": round(seconds, 3), "data": _source(source), "config": options.run_config,
                   "outputs": {"records": str(folder / "records.jsonl"), "summary": str(folder / "summary.json")},
                   "versions": library_versions()}
        write_json_atomic(folder / "summary.json", summary)
        summaries.append(summary)
    return summaries


def _source(source) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(source), default=str))
