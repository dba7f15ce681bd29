"""Run one block of sweep settings: the entry script's ``main(argv)`` in a subprocess, then one record per setting.

A block is one call of the script: a single setting, or (with the sweep's ``batch`` map) several settings
that differ only in batched axes, passed as the script's list flags. The subprocess is
``python -m utils.sweeps.entry <module> <argv...>`` in the directory the sweep was started from (relative
paths in flags mean what they mean on the command line), with the repository on PYTHONPATH. Its output
goes to ``<folder of the block's first setting>/sweep_log.txt``.

Each setting's record, ``<setting folder>/sweep_record.json``, is the sweep's result file:
``{"schema": "mergelm.sweep_record/1", "sweep", "id", "script", "flags", "labels", "argv", "resolved_config",
"status": "done" | "failed", "exit_status", "error" (last lines of the log when failed), "log", "host",
"started", "wall_time_s", "block_size"}``. A record is written only after the call ended, atomically.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.records import write_json_atomic

RECORD_NAME = "sweep_record.json"
LOG_NAME = "sweep_log.txt"
RECORD_SCHEMA = "mergelm.sweep_record/1"
TAIL_LINES = 20
REPO = Path(__file__).resolve().parents[2]


@dataclass
class SettingRun:
    """What a worker needs to know about one setting (plain data: pickled to SLURM / Ray workers)."""

    id: str
    folder: str
    flags: dict[str, Any]
    labels: dict[str, str]
    argv: list[str]
    resolved_config: dict[str, Any]


@dataclass
class Block:
    """One call of the entry script covering ``settings`` (one, or several batched ones)."""

    sweep: str
    module: str
    argv: list[str]
    settings: list[SettingRun]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)


def record_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / RECORD_NAME


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def run_block(block: Block) -> list[dict]:
    """Run the block's call and write every setting's record; returns the records (never raises for a
    failing script: its exit status and last lines are recorded instead)."""
    first = Path(block.settings[0].folder)
    for setting in block.settings:
        Path(setting.folder).mkdir(parents=True, exist_ok=True)
    log = first / LOG_NAME
    env = {**os.environ, **block.env, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "utils.sweeps.entry", block.module, *block.argv]
    started, wall = time.time(), time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        handle.write("$ python " + block.module + ".py " + " ".join(_quote(token) for token in block.argv) + "\n")
        handle.flush()
        try:
            status = subprocess.run(command, cwd=block.cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
        except OSError as error:
            handle.write(f"could not start the setting: {error}\n")
            status = 127
    seconds = time.perf_counter() - wall
    records = []
    for setting in block.settings:
        record = {
            "schema": RECORD_SCHEMA,
            "sweep": block.sweep,
            "id": setting.id,
            "script": block.module + ".py",
            "flags": setting.flags,
            "labels": setting.labels,
            "argv": setting.argv,
            "resolved_config": setting.resolved_config,
            "status": "done" if status == 0 else "failed",
            "exit_status": status,
            "error": None if status == 0 else tail(log),
            "log": str(log),
            "host": socket.gethostname(),
            "started": started,
            "wall_time_s": seconds,
            "block_size": len(block.settings),
        }
        write_json_atomic(record_path(setting.folder), record)
        records.append(record)
    return records


def _quote(token: str) -> str:
    import shlex

    return shlex.quote(token)
