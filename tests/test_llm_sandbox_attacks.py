"""The sandbox against programs that try to fake a pass, start processes, or read the parent's secrets.

Each attack is a real program run through :func:`run_program`; the assertions check what the parent sees
(status, error) and what is left on the machine afterwards (processes, files).
"""
from __future__ import annotations

import json
import os
import stat
import sys
import sysconfig
import tempfile
import time
import uuid

import pytest

from utils.llm.sandbox import _SUPERVISOR, ERROR_LIMIT, SandboxLimits, run_program
from utils.llm.scoring import human_eval_program, mbpp_program

FAST = SandboxLimits(timeout=3.0, memory_mb=512)


def _processes_with(token: str) -> list[int]:
    """Pids whose command line contains ``token`` (the sleep durations below are unique per test)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if token.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


# --- 1.a: exec(program, {}) as human-eval / bigcode-evaluation-harness; the clock starts after start-up ---

@pytest.mark.parametrize("guard", ['if __name__ == "__main__":', "if __name__=='__main__':",
                                   'if "__main__" == __name__:', "if (__name__ == '__main__'):"])
@pytest.mark.parametrize("body", ["    input()", "    while True:\n        pass"])
def test_main_blocks_never_run(guard, body):
    problem = {"prompt": "def add(a, b):\n", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
               "entry_point": "add"}
    completion = f"    return a + b\n\n{guard}\n{body}\n"
    result = run_program(human_eval_program(problem, completion), FAST)
    assert result.passed, result.error
    record = {"test_list": ["assert add(1, 1) == 2"]}
    assert run_program(mbpp_program(record, f"def add(a, b):\n    return a + b\n{guard}\n{body}\n"), FAST).passed


def test_program_sees_fresh_globals():
    assert run_program("assert __name__ == 'builtins'\nassert 'sys' not in globals()\n", FAST).passed


def test_wrong_function_still_fails_with_main_block():
    program = "def add(a, b):\n    return a - b\nif __name__ == '__main__':\n    print(add(1, 2))\nassert add(2, 3) == 5\n"
    assert run_program(program, FAST).error == "AssertionError"


def test_timeout_excludes_interpreter_start_up(tmp_path):
    """An interpreter that needs 2 s to start (a wrapper that sleeps) still runs a 0.5 s program under a
    1 s timeout: the clock starts when the runner reports it is ready."""
    slow = tmp_path / "slow_python"
    slow.write_text(f"#!/bin/sh\nsleep 1\nexec {sys.executable} \"$@\"\n")
    slow.chmod(slow.stat().st_mode | stat.S_IEXEC)
    start = time.monotonic()
    result = run_program("import time\ntime.sleep(0.5)\n", SandboxLimits(timeout=1.0), python=str(slow))
    assert time.monotonic() - start > 2.0
    assert result.passed, result.error
    assert result.seconds < 1.0
    assert run_program("import time\ntime.sleep(3)\n", SandboxLimits(timeout=1.0), python=str(slow)).status == "timeout"


# --- 3.a: a pass needs the runner's completion marker with the per-run secret ---

@pytest.mark.parametrize("program", [
    "import os\nos._exit(0)\nassert False\n",
    "import sys\nsys.exit(0)\nassert False\n",
    "raise SystemExit\n",
    "exit()\n",
    "import atexit, os\natexit.register(lambda: os._exit(0))\nassert False\n",
    "import atexit, os\natexit.register(os._exit, 0)\nraise ValueError('no')\n",
    "import threading, os, time\nthreading.Thread(target=lambda: (time.sleep(0.2), os._exit(0))).start()\ntime.sleep(5)\n",
])
def test_early_exits_are_failures(program):
    result = run_program(program, FAST)
    assert result.status == "failed" and not result.passed, result


def test_a_pass_does_not_wait_for_threads_or_exit_handlers():
    """Once exec has returned the tests have run: the runner reports and leaves at once, as human-eval
    records 'passed' when exec returns, whatever the program's threads or exit handlers do later."""
    program = ("import atexit, os, threading, time\natexit.register(os._exit, 1)\n"
               "threading.Thread(target=time.sleep, args=(30,)).start()\nassert 1 + 1 == 2\n")
    result = run_program(program, FAST)
    assert result.passed and result.seconds < 2.5, result


def test_syntax_error_fails_before_the_clock():
    result = run_program("def f(:\n    pass\n", FAST)
    assert result.status == "failed" and result.error.startswith("SyntaxError")


def test_forged_markers_are_failures():
    """The program writes the ready byte and 'D' + guesses to every descriptor, then leaves with 0."""
    program = ("import os\nfor fd in range(3, 64):\n    for guess in (b'R', b'D', b'D' + b'0' * 32, b'D' + b'f' * 32):\n"
               "        try:\n            os.write(fd, guess)\n        except OSError:\n            pass\nos._exit(0)\n")
    result = run_program(program, FAST)
    assert result.status == "failed"
    assert "completion marker" in result.error


INTROSPECTION = [
    ("import sys\nsys._getframe(1)\n", "frame access is not allowed"),
    ("import inspect\ninspect.stack()\n", "frame access is not allowed"),
    ("try:\n    1/0\nexcept Exception as e:\n    e.__traceback__.tb_frame\n", "'tb_frame' is not allowed"),
    ("def g():\n    yield 1\ng().gi_frame\n", "'gi_frame' is not allowed"),
    ("import gc\ngc.get_objects()\n", "'gc.get_objects' is not allowed"),
    ("import gc\ngc.get_referrers(1)\n", "'gc.get_referrers' is not allowed"),
    ("import sys\nsys.settrace(lambda *a: None)\n", "'sys.settrace' is not allowed"),
    ("import sys\nsys.setprofile(lambda *a: None)\n", "'sys.setprofile' is not allowed"),
    ("import signal\nsignal.signal(signal.SIGALRM, lambda s, f: None)\n", "signal.signal' is not allowed"),
    ("import _signal\n_signal.signal(14, lambda s, f: None)\n", "'_signal.signal' is not allowed"),
    ("import sys\nsys.modules['__main__']._main()\n", "has no attribute '_main'"),
    ("import sys\nsys.modules['__main__']._install_guard\n", "has no attribute '_install_guard'"),
    ("open('/proc/self/mem', 'rb')\n", "reading outside the working folder"),
]


@pytest.mark.parametrize("program, message", INTROSPECTION)
def test_runner_state_is_out_of_reach(program, message):
    """Routes to the runner's frames, the audit hook's closure (the secret) or raw memory are refused."""
    result = run_program(program, FAST)
    assert result.status == "failed" and message in result.error, result.error


def test_program_cannot_add_audit_hooks():
    """A hook of the program would see the runner's events; adding one is refused (silently, as CPython
    suppresses the refusal), so the program's hook never runs."""
    program = "import sys\nseen = []\nsys.addaudithook(lambda e, a: seen.append(e))\nopen('x', 'w')\nassert seen == []\n"
    assert run_program(program, FAST).passed


def test_standard_library_works_without_frames():
    program = ("import collections, typing, enum, dataclasses, logging, json, re, fractions, decimal, heapq\n"
               "P = collections.namedtuple('P', 'x y')\nclass C(typing.NamedTuple):\n    a: int\n"
               "Color = enum.Enum('Color', 'RED GREEN')\nlogging.getLogger('t').warning('fine')\n"
               "@dataclasses.dataclass\nclass D:\n    v: int = 1\nassert P(1, 2).y == 2 and C(3).a == 3 and D().v == 1\n"
               "import subprocess, multiprocessing, threading\nt = threading.Thread(target=lambda: None)\n")
    result = run_program(program, FAST)
    assert result.passed, result.stderr


# --- 3.b: no process starts, none outlives the call, nothing is written outside the folder ---

SPAWNERS = {
    "subprocess": "import subprocess\nsubprocess.Popen(['sleep', '{t}'], start_new_session=True)\n",
    "os.system": "import os\nos.system('setsid sleep {t} &')\n",
    "os.popen": "import os\nos.popen('setsid sleep {t} &')\n",
    "pty.spawn": "import pty\npty.spawn(['sleep', '{t}'])\n",
    "pty by file": ("import importlib.util, sysconfig\nspec = importlib.util.spec_from_file_location('p', "
                    "sysconfig.get_paths()['stdlib'] + '/pty.py')\nm = importlib.util.module_from_spec(spec)\n"
                    "spec.loader.exec_module(m)\nm.fork()\n"),
    "fork_exec import": "import _posixsubprocess\n_posixsubprocess.fork_exec(*range(23))\n",
    "fork_exec re-import": "import sys\ndel sys.modules['_posixsubprocess']\nimport _posixsubprocess\n",
    "asyncio subprocess": ("import asyncio\nasyncio.run(asyncio.create_subprocess_exec('sleep', '{t}', "
                           "start_new_session=True))\n"),
    "fork_exec via subprocess": "import subprocess\nsubprocess._fork_exec(*range(23))\n",
    "fork_exec by file": ("import importlib.util, os, sys\n"
                          "path = [os.path.join(d, f) for d in sys.path if os.path.isdir(d) for f in os.listdir(d) if f.startswith('_posixsubprocess')][0]\n"
                          "spec = importlib.util.spec_from_file_location('_posixsubprocess', path)\n"
                          "importlib.util.module_from_spec(spec).fork_exec\n"),
    "fork_exec renamed": ("import importlib.util, os, sys\n"
                          "path = [os.path.join(d, f) for d in sys.path if os.path.isdir(d) for f in os.listdir(d) if f.startswith('_posixsubprocess')][0]\n"
                          "spec = importlib.util.spec_from_file_location('pkg._posixsubprocess', path)\n"
                          "importlib.util.module_from_spec(spec).fork_exec\n"),
    "posix_spawn": "import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'setsid sleep {t} &'], {{}})\n",
    "posix_spawnp": "import posix\nposix.posix_spawnp('sleep', ['sleep', '{t}'], {{}}, setsid=True)\n",
    "fork": "import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '{t}'])\n",
    "forkpty": "import posix\nposix.forkpty()\n",
    "execv": "import os\nos.execv('/bin/sh', ['sh', '-c', 'setsid sleep {t} & wait'])\n",
    "spawnv": "import os\nos.spawnv(os.P_NOWAIT, '/bin/sleep', ['sleep', '{t}'])\n",
    "multiprocessing fork": ("import multiprocessing, time\nctx = multiprocessing.get_context('fork')\n"
                             "ctx.Process(target=time.sleep, args=({t},)).start()\n"),
    "multiprocessing spawn": ("import multiprocessing, time\nctx = multiprocessing.get_context('spawn')\n"
                              "ctx.Process(target=time.sleep, args=({t},)).start()\n"),
    "ctypes fork": "import ctypes\nctypes.CDLL(None).fork()\n",
    "_ctypes": "import _ctypes\n",
    "fresh posix": ("import _imp, importlib.machinery as m\n"
                    "p = _imp.create_builtin(m.ModuleSpec('posix', m.BuiltinImporter, origin='built-in'))\np.fork()\n"),
    "re-import posix": "import sys\ndel sys.modules['posix']\nimport posix\nposix.fork()\n",
    "reload os": "import importlib, os\nimportlib.reload(os)\nos.fork()\n",
    "sub-interpreter": "import _xxsubinterpreters\n",
    "own extension module": ("import importlib.util, shutil, sys, os\n"
                             "src = [os.path.join(d, f) for d in sys.path if os.path.isdir(d) for f in os.listdir(d) "
                             "if f.startswith('_json.')][0]\nshutil.copyfile(src, '_json.so')\n"
                             "spec = importlib.util.spec_from_file_location('_json', os.path.abspath('_json.so'))\n"
                             "importlib.util.module_from_spec(spec)\n"),
    "tcl exec": "import tkinter\ntkinter.Tcl().eval('exec sleep {t} &')\n",
}


@pytest.mark.parametrize("name", sorted(SPAWNERS))
def test_process_creation_is_refused_and_nothing_survives(name, tmp_path):
    token = f"{7000 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 10**6:06d}"
    escaped = tmp_path / "escaped"
    program = SPAWNERS[name].format(t=token) + f"open({str(escaped)!r}, 'w').write('x')\n"
    result = run_program(program, FAST)
    assert result.status == "failed", (name, result)
    # asyncio fails earlier, at its event loop's socket pair, and reports a follow-up error.
    kernel_refused = "landlock" in result.confinement and name == "pty by file"   # /dev/ptmx: Landlock says no first
    assert "not allowed" in result.error or name == "asyncio subprocess" or kernel_refused, (name, result.error)
    assert _processes_with(token) == []
    assert not escaped.exists()


def test_supervisor_kills_detached_descendants(tmp_path):
    """The sweep itself: a command (outside the guard) that leaves sleepers in new sessions, double-forked
    and re-parented, leaves nothing once the supervisor has returned."""
    import subprocess

    token = f"{8000 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 10**6:06d}"
    script = (f"setsid sleep {token} & setsid sh -c 'sleep {token} & sleep {token} &' & "
              f"sh -c 'setsid sleep {token} &' & sleep 0.3")
    report_r, report_w = os.pipe()
    status_r, status_w = os.pipe()
    secret_r, secret_w = os.pipe()
    try:
        supervisor = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _SUPERVISOR, str(report_w), str(status_w), str(secret_r), "60", "--",
             "sh", "-c", script], pass_fds=(report_w, status_w, secret_r), cwd=tmp_path, start_new_session=True)
        for fd in (report_w, status_w, secret_r):
            os.close(fd)
        assert supervisor.wait(timeout=30) == 0
        report = os.read(report_r, 100).decode().split()
    finally:
        for fd in (report_r, status_r, secret_w):
            os.close(fd)
    assert report[0] == "0" and int(report[1]) >= 4
    time.sleep(0.1)
    assert _processes_with(token) == []


def test_supervisor_wall_ceiling(tmp_path):
    """Without the parent (killed, say), the supervisor still ends a runner that sleeps, at its ceiling."""
    import subprocess

    report_r, report_w = os.pipe()
    status_r, status_w = os.pipe()
    secret_r, secret_w = os.pipe()
    start = time.monotonic()
    try:
        supervisor = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _SUPERVISOR, str(report_w), str(status_w), str(secret_r), "1", "--",
             "sleep", "60"], pass_fds=(report_w, status_w, secret_r), cwd=tmp_path, start_new_session=True)
        for fd in (report_w, status_w, secret_r):
            os.close(fd)
        supervisor.wait(timeout=30)
        report = os.read(report_r, 100).decode().split()
    finally:
        for fd in (report_r, status_r, secret_w):
            os.close(fd)
    assert report[0] == "-9" and time.monotonic() - start < 20


@pytest.mark.skipif(os.geteuid() == 0, reason="RLIMIT_NPROC does not apply to root")
def test_process_limit_for_ordinary_users():
    result = run_program("import threading\nthreading.Thread(target=print).start()\n", FAST)
    assert result.status == "failed" and "can't start new thread" in result.error


# --- 3.c: no reads outside the folder and the Python installation; short, scrubbed error text ---

def test_parent_environment_and_home_are_unreadable(monkeypatch):
    secret = "s3cret-" + uuid.uuid4().hex
    monkeypatch.setenv("MERGELM_TEST_API_KEY", secret)
    home = os.path.expanduser("~")
    paths = [f"/proc/{os.getpid()}/environ", "/proc/self/environ", "/proc/1/environ", "/sys/kernel/hostname",
             os.path.join(home, ".mergelm_sandbox_probe"), os.path.join(home, ".bashrc"), "/etc/passwd"]
    for path in paths:
        result = run_program(f"print(open({path!r}, 'rb').read())\n", FAST)
        assert result.status == "failed" and "reading outside the working folder" in result.error, (path, result)
        assert secret not in result.stdout + result.stderr + result.error
    program = ("import os\nwith open(f'/proc/{os.getppid()}/environ', 'rb') as f:\n    print(f.read())\n")
    result = run_program(program, FAST)
    assert "reading outside the working folder" in result.error
    for listing in ("import os\nos.listdir('/proc')\n", f"import os\nos.listdir({home!r})\n"):
        assert "listing outside the working folder" in run_program(listing, FAST).error


def test_stored_text_is_short_and_scrubbed(monkeypatch):
    secret = "tok-" + uuid.uuid4().hex
    monkeypatch.setenv("MERGELM_TEST_TOKEN", secret)
    program = f"print({secret!r} * 3)\nraise ValueError({secret!r} + 'x' * 5000)\n"
    result = run_program(program, FAST)
    assert result.status == "failed" and result.error.startswith("ValueError: [redacted]xxx")
    assert len(result.error) <= ERROR_LIMIT and len(result.stdout) <= 2000 and len(result.stderr) <= 2000
    for text in (result.error, result.stdout, result.stderr):
        assert secret not in text
    assert "[redacted]" in result.stdout


@pytest.mark.parametrize("program", [
    # a descriptor of an allowed directory, then a relative write through dir_fd
    "import os, sysconfig\nfd = os.open(sysconfig.get_paths()['stdlib'], os.O_RDONLY)\n"
    "os.open('escaped_probe.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)\n",
    "import os\nos.chdir('/')\nopen('tmp/escaped_probe.txt', 'w')\n",
    "import os\nfd = os.open('/', os.O_RDONLY)\nos.fchdir(fd)\n",
    "import os\nos.mkdir('a')\nos.chdir('a')\nfd = os.open('..', os.O_RDONLY)\n",
    "import os\nos.symlink('/proc/self/environ', 'link')\nopen('link').read()\n",
    "import os\nos.mkdir('a')\nfd = os.open('.', os.O_RDONLY)\nos.chdir('a')\n"
    "os.open('../../escaped_probe.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)\n",
])
def test_path_checks_cannot_be_sidestepped(program):
    result = run_program(program, FAST)
    assert result.status == "failed" and "not allowed" in result.error, result.error
    places = (sysconfig.get_paths()["stdlib"], "/", "/tmp", tempfile.gettempdir())
    assert not any(os.path.exists(os.path.join(place, "escaped_probe.txt")) for place in places)


def test_directory_work_inside_the_folder_is_allowed():
    program = ("import os, shutil, tempfile\nos.makedirs('a/b')\nopen('a/b/f.txt', 'w').write('1')\n"
               "os.chdir('a')\nassert open('b/f.txt').read() == '1'\nos.chdir(os.environ['HOME'])\n"
               "shutil.rmtree('a')\nwith tempfile.TemporaryDirectory() as d:\n"
               "    open(os.path.join(d, 'x'), 'w').write('2')\nassert not os.path.exists('a')\n")
    result = run_program(program, FAST)
    assert result.passed, result.stderr


def test_reads_inside_folder_and_standard_library_are_allowed():
    program = ("import os, json, sysconfig\nopen('data.txt', 'w').write('1')\nassert open('data.txt').read() == '1'\n"
               "assert os.listdir('.')\nassert open(os.path.join(sysconfig.get_paths()['stdlib'], 'os.py')).read()\n")
    assert run_program(program, FAST).passed


# --- through the evaluation pipeline ---

def test_human_eval_scoring_ignores_main_blocks_and_early_exits(tmp_path):
    """HumanEval/0 answered correctly with a demo block that loops forever (a spelling the original's
    post-processing does not cut) passes; HumanEval/1 answered with os._exit(0) fails."""
    from llm_helpers import ScriptedBackend
    from utils.llm.data import load_human_eval
    from utils.llm.evaluation import EvalOptions, evaluate_dataset, result_folder

    first = load_human_eval()[0][0].record

    def reply(prompt):
        if first["entry_point"] in prompt:
            return ("```python\n" + first["prompt"] + first["canonical_solution"]
                    + "\nif __name__ == '__main__':\n    while True:\n        input()\n```")
        return "```python\nimport os\nos._exit(0)\n```"
    options = EvalOptions(save_dir=str(tmp_path), save_name="scripted", end_index=2, code_timeout=2.0)
    summary = evaluate_dataset(ScriptedBackend(reply), "human_eval", options)
    assert summary["metrics"]["pass@1"] == 0.5
    rows = [json.loads(line) for line in
            (result_folder(tmp_path, "human_eval", "scripted") / "records.jsonl").read_text().splitlines()]
    assert [row["execution"]["status"] for row in rows] == ["passed", "failed"]
    assert "completion marker" in rows[1]["execution"]["error"] and len(rows[1]["execution"]["error"]) <= ERROR_LIMIT
