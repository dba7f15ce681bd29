"""Issue 19, item 3: sandbox escapes that need no crafted bytecode, and the classes they belong to.

Every listed escape runs through run_program twice: with the kernel layers (Landlock + seccomp, where this
kernel has them) and with the Python-level guard alone (the portable fallback); the assertions check the
machine afterwards (the victim process, files outside the folder, /dev/shm, the runner's pid). The kernel
layers are also tested on their own, under C-level calls that the Python guard never sees.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from utils.llm.sandbox import _RUNNER, SandboxLimits, run_program

BOTH = [pytest.param(True, id="kernel+python"), pytest.param(False, id="python-only")]


def _limits(kernel: bool, timeout: float = 3.0) -> SandboxLimits:
    return SandboxLimits(timeout=timeout, memory_mb=512, kernel_confinement=kernel)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@pytest.fixture
def victim():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


@pytest.mark.parametrize("kernel", BOTH)
def test_pidfd_cannot_signal_another_process(victim, kernel):
    program = (f"import os, signal\nfd = os.pidfd_open({victim.pid})\nsignal.pidfd_send_signal(fd, signal.SIGKILL)\n")
    result = run_program(program, _limits(kernel))
    time.sleep(0.2)
    assert not result.passed and victim.poll() is None and _alive(victim.pid), result.error


@pytest.mark.parametrize("kernel", BOTH)
def test_leaving_the_group_and_killing_the_supervisor_leaves_nothing_running(kernel):
    program = ("import os, signal, sys, time\nprint(os.getpid(), flush=True)\n"
               "for attempt in (os.setpgrp, os.setsid, lambda: os.setpgid(0, 0)):\n"
               "    try:\n        attempt()\n    except Exception as error:\n        print('refused', error, flush=True)\n"
               "parent = os.getppid()\n"
               "for kill in (lambda: os.kill(parent, 9), lambda: os.killpg(0, 9),\n"
               "             lambda: signal.pidfd_send_signal(os.pidfd_open(parent), 9)):\n"
               "    try:\n        kill()\n    except Exception as error:\n        print('refused', error, flush=True)\n"
               "time.sleep(60)\n")
    result = run_program(program, _limits(kernel, timeout=2.0))
    runner = int(result.stdout.split()[0])
    deadline = time.time() + 5
    while _alive(runner) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(runner) and result.status == "timeout", (result, result.stdout)
    assert "refused" in result.stdout


@pytest.mark.parametrize("kernel", BOTH)
def test_sqlite_attach_and_uris_cannot_reach_outside_files(tmp_path, kernel):
    outside = tmp_path / "outside.db"
    program = ("import sqlite3\n"
               f"c = sqlite3.connect('file:{outside}?mode=rwc', uri=True)\nc.execute('create table t(x)')\nc.commit()\n"
               f"d = sqlite3.connect(':memory:')\nd.execute(\"attach database '{tmp_path / 'attached.db'}' as a\")\n"
               "d.execute('create table a.t(x)')\nd.commit()\n")
    result = run_program(program, _limits(kernel))
    assert not result.passed and sorted(p.name for p in tmp_path.iterdir()) == [], result.error


@pytest.mark.parametrize("kernel", BOTH)
def test_readline_history_files_cannot_read_or_write_outside(tmp_path, kernel):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-" + uuid.uuid4().hex + "\n")
    program = ("import readline\n"
               f"readline.read_history_file({str(secret)!r})\nprint(readline.get_history_item(1))\n"
               f"readline.write_history_file({str(tmp_path / 'written')!r})\n")
    result = run_program(program, _limits(kernel))
    assert not result.passed and "TOPSECRET" not in result.stdout + result.stderr + result.error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]


@pytest.mark.parametrize("kernel", BOTH)
def test_shared_memory_objects_cannot_outlive_the_run(kernel):
    name = f"mergelm-{uuid.uuid4().hex[:12]}"
    program = (f"import _posixshmem, os\nfd = _posixshmem.shm_open('/{name}', os.O_CREAT | os.O_RDWR, 0o600)\n"
               f"os.ftruncate(fd, 4096)\n")
    program2 = (f"from multiprocessing import shared_memory\nshared_memory.SharedMemory(name={name!r}, create=True, "
                f"size=4096)\n")
    try:
        for source in (program, program2):
            result = run_program(source, _limits(kernel))
            assert not result.passed and not os.path.exists(f"/dev/shm/{name}"), result.error
    finally:
        if os.path.exists(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")


def test_correct_programs_still_pass_under_every_layer():
    program = ("import math, re, collections, heapq, itertools, json, string, random, fractions, decimal, datetime\n"
               "import hashlib, zlib, bisect, functools, statistics, threading\n"
               "assert math.isclose(statistics.mean([1, 2, 3]), 2) and hashlib.sha256(b'').hexdigest()[:4] == 'e3b0'\n"
               "assert zlib.decompress(zlib.compress(b'x' * 100)) == b'x' * 100\n"
               "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n")
    for kernel in (True, False):
        result = run_program(program, _limits(kernel))
        assert result.passed, (kernel, result.error, result.stderr)
        assert result.confinement.startswith("python-audit")


# --- the kernel layers alone: C-level calls the Python guard never sees --------------------------------------

KERNEL_PROBE = r'''
import ctypes, errno, os, sys
root, victim = sys.argv[1], int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
layers = _confine(root, [root, os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)], _seccomp)
print("layers", ",".join(layers))
def call(name, *args):
    result = getattr(libc, name)(*args)
    return "ok" if result >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
print("open_etc", call("open", b"/etc/hostname", os.O_RDONLY))
print("create_tmp", call("open", b"/tmp/../tmp/mergelm-kernel-probe-" + str(victim).encode(), os.O_CREAT | os.O_WRONLY, 0o600))
print("create_shm", call("open", b"/dev/shm/mergelm-kernel-probe-" + str(victim).encode(), os.O_CREAT | os.O_RDWR, 0o600))
print("create_here", call("open", (root + "/here.txt").encode(), os.O_CREAT | os.O_WRONLY, 0o600))
print("kill_other", call("kill", victim, 0))
print("kill_self", call("kill", os.getpid(), 0))
print("pidfd_open", call("syscall", 434, victim, 0))
print("fork", call("syscall", 57))
print("setpgid", call("setpgid", 0, 0))
print("socket", call("socket", 1, 1, 0))
print("shmget", call("syscall", 29, 0, 4096, 0o1600))
print("ptrace", call("syscall", 101, 16, victim, 0, 0))
print("setpriority_user", call("setpriority", 1, os.getuid(), 5))
'''


def test_kernel_layers_close_the_classes(tmp_path, victim):
    start = _RUNNER.index("def _confine(")
    source = _RUNNER[start:_RUNNER.index("def _install_guard(")] + KERNEL_PROBE
    folder = tmp_path / "box"
    folder.mkdir()
    done = subprocess.run([sys.executable, "-I", "-c", source, str(folder), str(victim.pid)], capture_output=True,
                          text=True, timeout=60)
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    if "seccomp" not in lines.get("layers", "") or "landlock" not in lines.get("layers", ""):
        pytest.skip(f"this kernel lacks Landlock or seccomp: {lines.get('layers')!r} {done.stderr[-300:]}")
    assert lines["create_here"] == "ok" and lines["kill_self"] == "ok", lines       # the folder and itself: allowed
    for probe in ("open_etc", "create_tmp", "create_shm", "kill_other", "pidfd_open", "fork", "setpgid", "socket",
                  "shmget", "ptrace", "setpriority_user"):
        assert lines[probe] in ("EPERM", "EACCES"), (probe, lines)
    assert victim.poll() is None
    assert not any(p.name.startswith("mergelm-kernel-probe") for p in __import__("pathlib").Path("/tmp").iterdir())


# --- human-eval's check: an object whose == is always True ----------------------------------------------------

PROBLEM = {"prompt": "def mean_pair(a, b):\n",
           "test": "def check(candidate):\n    assert candidate(2, 4) == 3\n    assert abs(candidate(1, 2) - 1.5) < 1e-9\n"
                   "    assert candidate(0, 0) in [0]\n",
           "entry_point": "mean_pair"}
FAKES = {
    "always equal": "    class Anything:\n        def __eq__(self, other):\n            return True\n"
                    "        def __sub__(self, other):\n            return 0\n        __hash__ = object.__hash__\n"
                    "    return Anything()\n",
    "C-level ne as eq": "    class Anything(float):\n        __eq__ = (0.5).__ne__\n        __sub__ = lambda self, other: 0.0\n"
                        "    return Anything(9)\n",
    "patched builtins": "    import builtins\n    builtins.abs = lambda value: 0\n    return {(2, 4): 3, (0, 0): 0}.get((a, b), 99)\n",
    "inside a list": "    class Anything:\n        __eq__ = lambda self, other: True\n    return [Anything()][0] if a < 0 else "
                     "(a + b) / 2 if (a, b) != (0, 0) else Anything()\n",
}


@pytest.mark.parametrize("fake", list(FAKES))
def test_a_result_that_only_claims_equality_fails(fake):
    from utils.llm.scoring import human_eval_program, mbpp_program

    result = run_program(human_eval_program(PROBLEM, FAKES[fake]), _limits(True))
    assert not result.passed and result.error.startswith("AssertionError"), (fake, result.error)
    record = {"test_list": ["assert mean_pair(2, 4) == 3", "assert abs(mean_pair(1, 2) - 1.5) < 1e-9",
                            "assert mean_pair(0, 0) == 0"]}
    result = run_program(mbpp_program(record, "def mean_pair(a, b):\n" + FAKES[fake]), _limits(True))
    assert not result.passed, (fake, result.error)


@pytest.mark.parametrize("body", ["    return (a + b) / 2\n",
                                  "    from fractions import Fraction\n    return Fraction(a + b, 2)\n",
                                  "    from collections import namedtuple\n    P = namedtuple('P', 'v w')\n"
                                  "    return P((a + b) / 2, 0).v\n",
                                  "    class Half(float):\n        pass\n    return Half((a + b) / 2)\n",
                                  "    import builtins\n    builtins.abs = lambda value: 0\n    return (a + b) / 2\n"])
def test_correct_results_of_any_honest_type_still_pass(body):
    from utils.llm.scoring import human_eval_program

    result = run_program(human_eval_program(PROBLEM, body), _limits(True))
    assert result.passed, (body, result.error, result.stderr)
