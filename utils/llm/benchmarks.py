"""The paper's LLM benchmarks, each declared once.

A benchmark is one :class:`Benchmark` in ``BENCHMARKS`` below (how its data is loaded, what text of a
record goes into the prompt, how generations are scored, which metric it reports, which standard file
it writes and under which result folder) plus its entry under ``datasets:`` in ``configs/llm_tasks.yaml``
(template, record field, decoding, stop strings, max tokens, prompts per vLLM call). Everything else —
``utils/llm/evaluation.py``, the entry scripts' ``--dataset_name`` / ``--datasets`` choices — looks a
benchmark up here by name and never matches names itself. Adding a benchmark = one declaration + its YAML.

Scoring rules (MergeLM's, see ``utils/llm/scoring.py``): GSM8K / MATH compare the answer extracted
after the answer phrase with the gold answer (accuracy = correct / problems); HumanEval / MBPP run
prompt + completion + tests in ``utils/llm/sandbox.py`` (pass@1 of one greedy completion); AlpacaEval
keeps the outputs only (its win rate needs a judge).
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from utils.llm.data import (DatasetSource, Example, load_alpaca_eval, load_gsm8k, load_human_eval, load_math,
                            load_mbpp)
from utils.llm.prompts import (code_prompt_input, field_input, fill_template, human_eval_input, load_task_config,
                               mbpp_input)
from utils.llm.sandbox import SandboxLimits, run_programs
from utils.llm.scoring import (HUMAN_EVAL_CLEANING, MBPP_CLEANING, CodeCleaning, extract_gsm8k_answer,
                               extract_gsm8k_flexible, extract_math_answer, extract_math_flexible, fenced_code,
                               gsm8k_is_correct, human_eval_program, math_is_correct, mbpp_program,
                               postprocess_code, split_generation)
from utils.records import write_json_atomic, write_jsonl_atomic, write_text_atomic


@dataclass(frozen=True)
class DataLocation:
    """Where local benchmark data lives (``--data_dir``, ``--alpaca_eval_path``; None = the loaders' defaults)."""

    data_dir: str | None = None
    alpaca_eval_path: str | None = None


@dataclass(frozen=True)
class ScoringContext:
    """What a scorer may need beyond the generations: the task config and the code sandbox settings."""

    config: Mapping[str, Any]
    sandbox: SandboxLimits
    workers: int = 2
    answer_extraction: str = "paper"   # "flexible": also the common final-answer forms (see scoring.py)
    code_from_fence: bool = False      # chat prompts: code is the answer's first fenced block


Rows = list[dict[str, Any]]
Loader = Callable[[DataLocation], "tuple[list[Example], DatasetSource]"]
PromptInput = Callable[[Mapping[str, Any], Mapping[str, Any]], str]
Scorer = Callable[[Sequence[Example], Sequence[str], ScoringContext], Rows]
StandardWriter = Callable[[Path, Sequence[Example], Rows, Sequence[str], DatasetSource, str], "Path | None"]


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: every behaviour that differs between benchmarks (its constants are in the YAML)."""

    name: str
    load: Loader                      # examples in the original order + where they came from
    prompt_input: PromptInput         # (record, config) -> the text put into the template
    score: Scorer                     # one row per example: extracted, gold, correct (+ execution for code)
    write_standard: StandardWriter    # the original's combined file next to the result folder (or None)
    result_root: str                  # <save_dir>/<result_root>/[<tasks>/]<name>/<save_name>
    metric: str | None = None         # "accuracy" / "pass@1"; None: no local metric
    counts_invalid: bool = False      # also report problems without an extracted answer
    tabs_in_input: bool = False       # code prompts: every run of four spaces becomes a tab
    executes_code: bool = False       # scoring runs programs (the sandbox limits go into the summary)
    reference: Callable[[Mapping[str, Any]], str] | None = None   # the reference response (--metric nll)

    def prompt(self, record: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> str:
        """The exact prompt string the original sends to the model for one record."""
        config = config or load_task_config()
        text = self.prompt_input(record, config)
        if self.tabs_in_input:
            text = code_prompt_input(text, config)
        return fill_template(self.name, text, config)

    def chat_message(self, record: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> str:
        """The user turn of ``--prompt_format chat``: ``chat.instructions.<name>`` of the YAML with
        ``{input}`` replaced by the record text (code keeps its spaces: no tab rewrite)."""
        config = config or load_task_config()
        instructions = config.get("chat", {}).get("instructions", {})
        if self.name not in instructions:
            raise ValueError(f"configs/llm_tasks.yaml: chat.instructions has no entry for {self.name}")
        return instructions[self.name].replace("{input}", self.prompt_input(record, config))


# --- reference responses (teacher-forced answer NLL, utils/llm/nll.py) ---------------------------------

CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_response(answer: str) -> str:
    """The GSM8K reference solution in the form the scorer reads: calculator annotations removed, then
    ``The answer is: N`` (the paper's answer phrase)."""
    body, _, final = answer.rpartition("####")
    body = CALCULATOR.sub("", body).strip()
    return f"{body}\nThe answer is: {final.strip().replace(',', '')}"


def fenced_python(code: str) -> str:
    """Code as a chat model answers it: one fenced python block (Windows line ends normalised)."""
    return "```python\n" + code.replace("\r\n", "\n").strip() + "\n```"


def _human_eval_reference(record: Mapping[str, Any]) -> str:
    return fenced_python(record["prompt"] + record["canonical_solution"])


# --- scorers ---------------------------------------------------------------------------------------

def _score_answers(examples: Sequence[Example], generations: Sequence[str], context: ScoringContext, *,
                   extract: Callable[[str, str], Any], flexible: Callable[[str, str], Any],
                   is_correct: Callable[[Any, Any], bool]) -> Rows:
    phrase = context.config["scoring"]["answer_phrase"]
    extract = flexible if context.answer_extraction == "flexible" else extract
    rows = []
    for example, generation in zip(examples, generations):
        extracted = extract(generation, phrase)
        rows.append({"extracted": extracted, "gold": example.gold, "correct": is_correct(extracted, example.gold)})
    return rows


def _score_programs(examples: Sequence[Example], generations: Sequence[str], context: ScoringContext, *,
                    cleaning: CodeCleaning, program: Callable[[dict, str], str],
                    gold: Callable[[Example], Any]) -> Rows:
    programs, rows = [], []
    for example, generation in zip(examples, generations):
        if context.code_from_fence:
            completion, all_code = fenced_code(generation), generation
        else:
            completion, all_code = split_generation(generation, context.config["scoring"]["code_response_marker"])
            completion = postprocess_code(completion, cleaning)
        programs.append(program(example.record, completion))
        rows.append({"extracted": completion, "all_code": all_code, "gold": gold(example)})
    for row, result in zip(rows, run_programs(programs, context.sandbox, workers=context.workers)):
        row.update(correct=result.passed, execution={"status": result.status, "error": result.error,
                                                     "seconds": result.seconds})
    return rows


def _keep_outputs(examples: Sequence[Example], generations: Sequence[str], context: ScoringContext) -> Rows:
    return [{"extracted": generation, "gold": example.record.get("output"), "correct": None}
            for example, generation in zip(examples, generations)]


# --- the original's combined files -----------------------------------------------------------------

def _write_model_outputs(folder: Path, examples: Sequence[Example], rows: Rows, generations: Sequence[str],
                         source: DatasetSource, generator: str) -> Path:
    """AlpacaEval ``model_outputs.json``: [{instruction, output, generator, dataset}]."""
    path = folder.with_name(folder.name + ".json")
    write_json_atomic(path, [{"instruction": example.record["instruction"], "output": generation,
                              "generator": generator, "dataset": example.record.get("dataset")}
                             for example, generation in zip(examples, generations)])
    return path


def _write_human_eval_samples(folder: Path, examples: Sequence[Example], rows: Rows, generations: Sequence[str],
                              source: DatasetSource, generator: str) -> Path:
    """human-eval samples (JSON Lines of task_id, completion, all_code)."""
    path = folder.with_name(folder.name + ".jsonl")
    write_jsonl_atomic(path, [{"task_id": example.task_id, "completion": row["extracted"], "all_code": row["all_code"]}
                              for example, row in zip(examples, rows)])
    # human-eval's evaluate_functional_correctness refuses samples that do not cover every problem of its
    # problem file: the problems of this slice go next to the samples, for --problem_file.
    write_jsonl_atomic(folder.with_name(folder.name + "_problems.jsonl"), [example.record for example in examples])
    return path


def _write_mbpp_generations(folder: Path, examples: Sequence[Example], rows: Rows, generations: Sequence[str],
                            source: DatasetSource, generator: str) -> Path:
    """One JSON array with one list of completions per problem of the full file (index = position),
    as bigcode-evaluation-harness ``--load_generations_path`` reads it."""
    path = folder.with_name(folder.name + ".jsonl")
    per_problem: list[list[str]] = [[] for _ in range(source.num_total)]
    for example, row in zip(examples, rows):
        per_problem[example.index].append(row["extracted"])
    write_text_atomic(path, json.dumps(per_problem))
    return path


def _no_standard_file(folder: Path, examples: Sequence[Example], rows: Rows, generations: Sequence[str],
                      source: DatasetSource, generator: str) -> None:
    return None  # the original only logged GSM8K / MATH results


# --- the registry ----------------------------------------------------------------------------------

def _from_data_dir(loader: Callable[[str | None], Any]) -> Loader:
    return lambda location: loader(location.data_dir)


BENCHMARKS: dict[str, Benchmark] = {benchmark.name: benchmark for benchmark in (
    Benchmark("alpaca_eval", load=lambda location: load_alpaca_eval(location.alpaca_eval_path),
              prompt_input=functools.partial(field_input, "alpaca_eval"), score=_keep_outputs,
              write_standard=_write_model_outputs, result_root="save_gen_instruct_responses_results",
              reference=lambda record: record["output"]),
    Benchmark("gsm8k", load=_from_data_dir(load_gsm8k), prompt_input=functools.partial(field_input, "gsm8k"),
              score=functools.partial(_score_answers, extract=extract_gsm8k_answer,
                                    flexible=extract_gsm8k_flexible, is_correct=gsm8k_is_correct),
              write_standard=_no_standard_file, result_root="save_gen_math_results", metric="accuracy",
              counts_invalid=True, reference=lambda record: gsm8k_response(record["answer"])),
    Benchmark("MATH", load=_from_data_dir(load_math), prompt_input=functools.partial(field_input, "MATH"),
              score=functools.partial(_score_answers, extract=extract_math_answer,
                                    flexible=extract_math_flexible, is_correct=math_is_correct),
              write_standard=_no_standard_file, result_root="save_gen_math_results", metric="accuracy",
              counts_invalid=True, reference=lambda record: record["output"]),
    Benchmark("human_eval", load=lambda location: load_human_eval(), prompt_input=human_eval_input,
              score=functools.partial(_score_programs, cleaning=HUMAN_EVAL_CLEANING, program=human_eval_program,
                                      gold=lambda example: example.record.get("test")),
              write_standard=_write_human_eval_samples, result_root="save_gen_codes_results", metric="pass@1",
              tabs_in_input=True, executes_code=True, reference=_human_eval_reference),
    Benchmark("mbpp", load=_from_data_dir(load_mbpp), prompt_input=mbpp_input,
              score=functools.partial(_score_programs, cleaning=MBPP_CLEANING, program=mbpp_program,
                                      gold=lambda example: example.gold),
              write_standard=_write_mbpp_generations, result_root="save_gen_codes_results", metric="pass@1",
              tabs_in_input=True, executes_code=True, reference=lambda record: fenced_python(record["code"])),
)}
DATASETS = tuple(BENCHMARKS)


def get_benchmark(name: str) -> Benchmark:
    """The declaration of ``name``; ValueError naming the known benchmarks otherwise."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown dataset '{name}'; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def load_dataset(name: str, *, data_dir: str | None = None,
                 alpaca_eval_path: str | None = None) -> tuple[list[Example], DatasetSource]:
    """Examples of benchmark ``name`` in the original order, and where they came from."""
    return get_benchmark(name).load(DataLocation(data_dir=data_dir, alpaca_eval_path=alpaca_eval_path))


def build_prompt(dataset: str, record: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> str:
    """The exact prompt string the original sends to the model for one record of ``dataset``."""
    return get_benchmark(dataset).prompt(record, config)
