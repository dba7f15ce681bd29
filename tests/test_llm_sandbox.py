"""The code sandbox: pass, failure, endless loop, memory hog, writes outside its folder, secrets, processes."""
from __future__ import annotations

import os
import time

import pytest

from utils.llm.sandbox import SandboxLimits, pass_at_k, run_program, run_programs

FAST = SandboxLimits(timeout=2.0, memory_mb=512)


def test_passing_program():
    result = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n", FAST)
    assert result.passed and result.status == "passed" and result.returncode == 0
    assert result.stdout.strip() == "ok"


def test_failing_assertion():
    result = run_program("assert 1 + 1 == 3\n", FAST)
    assert not result.passed and result.status == "failed"
    assert result.error == "AssertionError"


def test_exit_before_the_tests_is_a_failure():
    result = run_program("import sys\nsys.exit(0)\nassert False\n", FAST)
    assert result.status == "failed" and result.error.startswith("SystemExit")
    assert run_program("exit()\n", FAST).status == "failed"


def test_endless_loop_times_out():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", SandboxLimits(timeout=1.0))
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 10


def test_sleeping_child_is_killed_on_wall_timeout():
    result = run_program("import time\ntime.sleep(60)\n", SandboxLimits(timeout=1.0))
    assert result.status == "timeout"
    assert result.seconds < 10


def test_memory_limit():
    result = run_program("block = bytearray(2 * 1024 ** 3)\n", FAST)
    assert result.status == "failed" and result.error == "MemoryError"


def test_write_outside_folder_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    program = f"open({str(target)!r}, 'w').write('x')\n"
    result = run_program(program, FAST)
    assert result.status == "failed" and "PermissionError" in result.error
    assert not target.exists()


def test_delete_outside_folder_is_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("data")
    result = run_program(f"import os\nos.remove({str(victim)!r})\n", FAST)
    assert "PermissionError" in result.error and victim.read_text() == "data"
    result = run_program(f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n", FAST)
    assert "PermissionError" in result.error and victim.exists()


def test_writes_inside_folder_are_allowed():
    program = ("import os, tempfile\nopen('local.txt', 'w').write('x')\nassert open('local.txt').read() == 'x'\n"
               "os.remove('local.txt')\nwith tempfile.NamedTemporaryFile() as handle:\n    handle.write(b'1')\n")
    assert run_program(program, FAST).passed


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("SANDBOX_TEST_SECRET_TOKEN", "hunter2")
    program = ("import os\nassert 'SANDBOX_TEST_SECRET_TOKEN' not in os.environ\n"
               "assert 'hunter2' not in repr(dict(os.environ))\nprint(sorted(os.environ))\n")
    result = run_program(program, FAST)
    assert result.passed, result.stderr
    assert "HOME" in result.stdout and "SANDBOX" not in result.stdout


@pytest.mark.parametrize("program, event", [
    ("import subprocess\nsubprocess.run(['true'])\n", "subprocess.Popen"),
    ("import os\nos.system('true')\n", "os.system"),
    ("import os\nos.fork()\n", "os.fork"),
    ("import socket\nsocket.socket()\n", "socket.__new__"),
    ("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))\n", "resource.setrlimit"),
])
def test_processes_network_and_limits_are_refused(program, event):
    result = run_program(program, FAST)
    assert result.status == "failed"
    assert f"'{event}' is not allowed" in result.error


def test_file_size_limit():
    result = run_program("open('big.bin', 'wb').write(b'0' * (8 * 2 ** 20))\n",
                         SandboxLimits(timeout=2.0, file_size_mb=1))
    assert result.status == "failed" and "File too large" in result.error


def test_folder_is_removed_and_order_kept():
    programs = ["import os\nprint(os.getcwd())\n", "assert False\n", "print(2)\n"]
    results = run_programs(programs, FAST, workers=2)
    assert [r.status for r in results] == ["passed", "failed", "passed"]
    assert not os.path.exists(results[0].stdout.strip())
    assert results[2].stdout.strip() == "2"


def test_pass_at_k():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)
    with pytest.raises(ValueError):
        SandboxLimits(timeout=0)
