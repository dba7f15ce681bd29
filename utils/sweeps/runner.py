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
LOCK_NAME = ".sweep_setting.lock"
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


class FileLock:
    """An exclusive flock on a file, held through one open descriptor. The kernel drops it when every
    process holding that descriptor has ended, so a killed holder never keeps it."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path = fd, path

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def held_lock(path: Path) -> FileLock | None:
    """Take the lock at `path` without waiting (a FileLock), or None when another process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} {os.getpid()} {time.time():.0f}\n".encode())
    return FileLock(fd, path)


def lock_is_held(folder: str | os.PathLike) -> bool:
    """True while a process holds the setting's lock (it is running that setting now)."""
    path = Path(folder) / LOCK_NAME
    if not path.exists():
        return False
    lock = held_lock(path)
    if lock is None:
        return True
    lock.release()
    return False


def _holder(path: Path) -> str:
    try:
        host, pid, _ = path.read_text(encoding="utf-8").split()
        return f"pid {pid} on {host}"
    except (OSError, ValueError):
        return "another process"


def run_block(block: Block) -> list[dict]:
    """Run the block's call and write every setting's record; returns the records (never raises for a
    failing script: its exit status and last lines are recorded instead).

    Each setting's lock (``<folder>/.sweep_setting.lock``) is taken first and handed to the script's
    process, so it is held exactly as long as that process lives, even if this driver is killed: a
    resume meanwhile reports the setting as running (status "running", no record written) instead of
    starting it a second time."""
    locks: list[FileLock] = []
    try:
        for setting in block.settings:
            Path(setting.folder).mkdir(parents=True, exist_ok=True)
            path = Path(setting.folder) / LOCK_NAME
            lock = held_lock(path)
            if lock is None:
                why = f"its lock {path} is held by {_holder(path)}"
                return [{"id": s.id, "status": "running", "error": why} for s in block.settings]
            locks.append(lock)
        return _run_locked(block, [lock.fd for lock in locks])
    finally:
        for lock in locks:
            lock.release()


def _run_locked(block: Block, lock_fds: list[int]) -> list[dict]:
    first = Path(block.settings[0].folder)
    log = first / LOG_NAME
    env = {**os.environ, **block.env, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "utils.sweeps.entry", block.module, *block.argv]
    started, wall = time.time(), time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        handle.write("$ python " + block.module + ".py " + " ".join(_quote(token) for token in block.argv) + "\n")
        handle.flush()
        try:
            status = subprocess.run(command, cwd=block.cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                    check=False, pass_fds=lock_fds).returncode
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
