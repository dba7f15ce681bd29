"""history.jsonl of a merge search: a header line, then one line per finished trial.

Torch-free, so that search_merge.py refuses a resume from another template or sampler before torch loads; the
search (utils/search/search.py) opens the same file through :class:`History`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from model_merging_methods import MergeError


class SearchError(MergeError):
    """A user error of the search (exit 2, one line): bad budget, a resumed history from another template..."""


def read_history(path: Path, expected: dict) -> list[dict]:
    """The rows of an existing history (a last line cut by a kill is dropped); SearchError when it has no header
    or its header differs from ``expected`` in template, fitness or sampler (the keys ``expected`` has)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        rows = [json.loads(line) for line in lines]
    except ValueError:
        # a line cut by a kill is the only one that can be incomplete: the last; drop it
        rows = [json.loads(line) for line in lines[:-1]]
    if not rows or rows[0].get("kind") != "header":
        raise SearchError(f"{path} is not a search history (no header line)")
    recorded = rows[0]
    for key, what in (("template_sha256", "template"), ("fitness", "fitness"), ("sampler", "sampler")):
        if key in expected and recorded.get(key) != expected[key]:
            raise SearchError(f"resumed history {path} comes from another {what} "
                              f"({recorded.get(key)} there, {expected[key]} now); use a new --output_dir")
    return rows


def check_resume(path: Path, expected: dict, resume: bool) -> list[dict] | None:
    """The rows of the history to resume (None: there is none); SearchError when it exists without ``resume`` or
    does not match ``expected``."""
    if not path.exists():
        return None
    if not resume:
        raise SearchError(f"{path} exists: pass --resume to continue that search, or choose another --output_dir")
    return read_history(path, expected)


class History:
    """history.jsonl: a header line, then one line per finished trial (appended, flushed, fsynced)."""

    def __init__(self, path: Path, header: dict, resume: bool):
        self.path, self.header = path, header
        self.trials: list[dict] = []
        rows = check_resume(path, header, resume)
        if rows is not None:
            self.trials = [row for row in rows[1:] if row.get("kind") == "trial"]
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._append(header)

    def _append(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, default=float) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def add(self, row: dict) -> None:
        self._append(row)
        self.trials.append(row)
