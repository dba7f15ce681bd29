"""Run one block of sweep settings: the entry script's ``main(argv)`` in a subprocess, then one record per setting.

A block is one call of the script: a single setting, or (with the sweep's ``batch`` map) several settings
that differ only in batched axes, passed as the script's list flags. The subprocess is
``python -m utils.sweeps.entry <module> <argv...>`` in the directory the sweep was started from (relative
paths in flags mean what they mean on the command line), with the repository on PYTHONPATH. Its output
goes to ``<folder of the block's first setting>/sweep_log.txt``.

Each setting's record, ``<setting folder>/sweep_record.json``, is the sweep's result file:
``{"schema": "mergelm.sweep_record/1", "sweep", "id", "script", "flags", "labels", "argv", "resolved_config",
"status": "done" | "failed" | "interrupted", "exit_status", "error" (last lines of the log when failed),
"log", "host", "started", "wall_time_s", "block_size"}``. A record is written only after the call ended,
atomically.

Progress: the process gets ``MERGELM_PROGRESS=<folder of the block's first setting>/sweep_progress.json``;
its loops report step / total / rate / ETA there and as ``progress:`` lines in the log (utils/progress.py).

Stops: the process runs in its own process group (a terminal's Ctrl-C reaches only the driver).
:func:`stop_children` — called by the driver's SIGINT / SIGTERM handler (utils/sweeps/driver.py) —
forwards the signal to every running group; the blocks then wait for their process (SIGKILL after
``STOP_GRACE_S``, or at a second signal), write ``interrupted`` records and start nothing more. Any process
left in a group after its leader ended is killed, so nothing outlives the sweep.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils import progress
from utils.records import write_json_atomic

RECORD_NAME = "sweep_record.json"
LOG_NAME = "sweep_log.txt"
LOCK_NAME = ".sweep_setting.lock"
RECORD_SCHEMA = "mergelm.sweep_record/1"
TAIL_LINES = 20
POLL_S = 0.5         # how often a block looks at its process (and at a stop request)
STOP_GRACE_S = 30.0  # after a forwarded signal, how long a process may take to end before SIGKILL
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


class _Children:
    """The process groups this driver runs now, and the signal that stops them (None while running)."""

    lock = threading.Lock()
    running: set = set()
    signum: int | None = None
    stop_time: float | None = None
    hard: bool = False


def reset_stop() -> None:
    """A new run starts: no stop requested."""
    with _Children.lock:
        _Children.signum, _Children.stop_time, _Children.hard = None, None, False


def stop_requested() -> int | None:
    """The signal a stop was requested with, or None."""
    return _Children.signum


def stop_children(signum: int) -> int:
    """Forward ``signum`` to every running setting's process group and start nothing more; a second call
    kills them (SIGKILL). Returns how many groups were signalled. Safe in a signal handler."""
    with _Children.lock:
        if _Children.signum is not None:
            _Children.hard = True
        else:
            _Children.signum, _Children.stop_time = signum, time.monotonic()
        groups = list(_Children.running)
    for process in groups:
        _signal_group(process, signal.SIGKILL if _Children.hard else signum)
    return len(groups)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _wait(process: subprocess.Popen) -> int:
    """Wait for the process, killing its group when a stop lasts longer than STOP_GRACE_S; on an exception
    in this thread (a Ray task cancelled) the group is stopped first, then the exception goes on."""
    killed = False
    try:
        while True:
            try:
                return process.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                pass
            stop = _Children.stop_time
            if not killed and stop is not None and (_Children.hard or time.monotonic() - stop > STOP_GRACE_S):
                _signal_group(process, signal.SIGKILL)
                killed = True
    except BaseException:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
        raise


def run_block(block: Block) -> list[dict]:
    """Run the block's call and write every setting's record; returns the records (never raises for a
    failing script: its exit status and last lines are recorded instead).

    Each setting's lock (``<folder>/.sweep_setting.lock``) is taken first and handed to the script's
    process, so it is held exactly as long as that process lives, even if this driver is killed: a
    resume meanwhile reports the setting as running (status "running", no record written) instead of
    starting it a second time."""
    locks: list[FileLock] = []
    if stop_requested() is not None:
        return []   # stopping: a block not started stays pending (no record)
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
    started, wall = time.time(), time.perf_counter()
    progress_file = first / progress.FILE_NAME
    env = {**os.environ, **block.env, "PYTHONUNBUFFERED": "1", progress.ENV: str(progress_file.resolve()),
           progress.STARTED_ENV: f"{started:.3f}"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "utils.sweeps.entry", block.module, *block.argv]
    progress.write(progress_file, {"schema": progress.SCHEMA, "pid": None, "setting_started": started, "updated": started,
                                   "stage": "starting"})
    with open(log, "w", encoding="utf-8") as handle:
        handle.write("$ python " + block.module + ".py " + " ".join(_quote(token) for token in block.argv) + "\n")
        handle.flush()
        try:
            process = subprocess.Popen(command, cwd=block.cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                       pass_fds=lock_fds, start_new_session=True)
        except OSError as error:
            handle.write(f"could not start the setting: {error}\n")
            process = None
            status = 127
        if process is not None:
            with _Children.lock:
                _Children.running.add(process)
                signum = _Children.signum
            if signum is not None:   # the stop came while it was starting
                _signal_group(process, signum)
            try:
                status = _wait(process)
            finally:
                with _Children.lock:
                    _Children.running.discard(process)
                _signal_group(process, signal.SIGKILL)   # whatever it left behind in its group
    seconds = time.perf_counter() - wall
    interrupted = stop_requested() is not None and status != 0
    if interrupted:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"sweep: interrupted by signal {stop_requested()} (the process ended with status {status})\n")
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
            "status": "done" if status == 0 else "interrupted" if interrupted else "failed",
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
    progress_file.unlink(missing_ok=True)   # the records say how it ended; a progress file left = no record came
    return records


def _quote(token: str) -> str:
    import shlex

    return shlex.quote(token)
