"""Issue 19, item 4: sweeps driven the way they go wrong — a script that creates its own output folder, SLURM
asked for where there is none, a damaged record, a driver killed while its setting runs, two drivers."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import save_tiny_llama
from tests.test_sweeps import REPO, TESTS, calls, sweep_file, sweep_main
from utils.sweeps import RunOptions, plan, run, status_text


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    return tmp_path


def test_output_flag_drives_a_script_that_creates_its_output_folder(workdir):
    """merge_models.py refuses an existing --output_dir; the setting's folder holds the record and log."""
    base = save_tiny_llama(workdir / "models" / "base", seed=0)
    ft = save_tiny_llama(workdir / "models" / "ft", 1, base)
    spec = {"name": "merges", "script": "merge_models.py", "output_root": "out", "output_flag": "output_dir",
            "fixed": {"base_model": str(base), "models": [str(ft)], "method": "task_arithmetic", "no_progress": True},
            "axes": {"scaling_coefficient": [0.5, 1.0]}}
    path = workdir / "merges.yml"
    path.write_text(yaml.safe_dump(spec))
    result = run(path, RunOptions(workers=1))
    assert result.counts()["done"] == 2, status_text(result)
    for item in result.settings:
        folder = item.setting.folder
        assert (folder / "output" / "model.safetensors").is_file() and (folder / "sweep_log.txt").is_file()
    # a forced rerun with --overwrite replaces each merged model, not the setting's log and record
    again = run(path, RunOptions(workers=1, force=True, overrides={"overwrite": True}))
    assert again.counts()["done"] == 2, status_text(again)
    for item in again.settings:
        assert (item.setting.folder / "sweep_log.txt").read_text().startswith("$ python merge_models.py")
        assert (item.setting.folder / "output" / "model.safetensors").is_file()


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="SLURM is installed here")
def test_slurm_launcher_without_slurm_is_refused(workdir, capsys):
    path = sweep_file(workdir)
    assert sweep_main()(["run", str(path), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "SLURM is not available" in err and "--slurm_cluster local" in err
    assert calls(workdir) == [] and not (workdir / "out" / ".submitit").exists()


@pytest.mark.parametrize("content", ["[1, 2]", "\"done\"", "null", "3"])
def test_a_record_that_is_json_but_not_an_object_counts_as_not_done(workdir, capsys, content):
    path = sweep_file(workdir, axes={"x": [1.0]}, seeds=[0])
    run(path, RunOptions(workers=1))
    folder = plan(path).settings[0].setting.folder
    (folder / "sweep_record.json").write_text(content)
    assert sweep_main()(["status", str(path)]) == 0
    assert "0 done, 0 running, 1 pending, 0 failed, 0 interrupted" in capsys.readouterr().out


def test_a_setting_whose_lock_is_held_is_not_started_again(workdir):
    LOCK_NAME = ".sweep_setting.lock"
    path = sweep_file(workdir, axes={"x": [1.0, 2.0]}, seeds=[0])
    first = plan(path).settings[0].setting
    first.folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(first.folder / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert plan(path).counts().get("running") == 1
        result = run(path, RunOptions(workers=1))
        assert result.counts() == {"done": 1, "failed": 0, "pending": 0, "running": 1, "interrupted": 0}
        assert [c["xs"] for c in calls(workdir)] == [[2.0]]
    finally:
        holder.kill()                 # a dead holder keeps nothing
        holder.wait()
    assert run(path, RunOptions(workers=1)).counts()["done"] == 2
    assert sorted(c["xs"][0] for c in calls(workdir)) == [1.0, 2.0]


def test_a_killed_driver_does_not_lead_to_a_setting_running_twice(workdir):
    path = sweep_file(workdir, axes={"x": [1.0]}, seeds=[0], fixed={"save_dir": "res", "sleep": 6.0})
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    driver = subprocess.Popen([sys.executable, str(REPO / "scripts" / "sweep.py"), "run", str(path)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not calls(workdir):
        assert time.time() < deadline and driver.poll() is None, "the setting never started"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)        # the setting's process lives on, an orphan
    driver.wait()
    resumed = run(path, RunOptions(workers=1))
    assert resumed.counts().get("running") == 1 and len(calls(workdir)) == 1
    deadline = time.time() + 60
    while plan(path).counts().get("running"):      # the orphan ends: its lock goes with it
        assert time.time() < deadline
        time.sleep(0.2)
    assert run(path, RunOptions(workers=1)).counts()["done"] == 1 and len(calls(workdir)) == 2


def test_a_second_run_of_the_same_sweep_is_refused(workdir, capsys):
    path = sweep_file(workdir, axes={"x": [1.0]}, seeds=[0])
    from utils.sweeps.runner import held_lock

    (workdir / "out").mkdir()
    lock = held_lock(workdir / "out" / ".sweep-toy.lock")
    try:
        assert sweep_main()(["run", str(path)]) == 2
        assert "already running" in capsys.readouterr().err and calls(workdir) == []
    finally:
        lock.release()
    assert sweep_main()(["run", str(path)]) == 0


def _wait_for(condition, seconds: float = 60.0, what: str = "") -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as gone (it has ended; only its parent has not collected it yet)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_driver_stops_its_setting_records_it_interrupted_and_exits_128_plus_signal(workdir, signum):
    """Issue 26 item 2: the driver forwards SIGTERM / SIGINT, waits, records `interrupted`, exits 143 / 130;
    `status` showed the setting running with its progress first; a second run resumes it."""
    path = sweep_file(workdir, axes={"x": [1.0, 2.0]}, seeds=[0], fixed={"save_dir": "res", "sleep": 60.0})
    env = {**os.environ, "PYTHONPATH": str(TESTS), "MERGELM_PROGRESS_LOG_EVERY": "0.5"}
    driver = subprocess.Popen([sys.executable, str(REPO / "scripts" / "sweep.py"), "run", str(path), "--workers", "1",
                               "--progress_every", "0.5"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = plan(path).settings[0]
    progress_file = first.setting.folder / "sweep_progress.json"
    _wait_for(lambda: (json.loads(progress_file.read_text()).get("step") or 0) >= 3 if progress_file.exists() else False,
              what="the setting's progress")
    child = json.loads(progress_file.read_text())["pid"]
    assert child != driver.pid and _alive(child)
    status = subprocess.run([sys.executable, str(REPO / "scripts" / "sweep.py"), "status", str(path)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "1 running" in status.stdout and "1 pending" in status.stdout, status.stdout
    assert f"running {first.setting.id}" in status.stdout and "/600 ticks" in status.stdout and "ETA" in status.stdout
    driver.send_signal(signum)
    out, _ = driver.communicate(timeout=60)
    assert driver.returncode == 128 + signum, out
    assert not _alive(child), "the setting's process outlived the driver"
    record = json.loads((first.setting.folder / "sweep_record.json").read_text())
    assert record["status"] == "interrupted" and record["exit_status"] != 0
    log = (first.setting.folder / "sweep_log.txt").read_text()
    assert "progress: toy sleep" in log
    # a stop is not a bug: the setting's process ends with one line, no traceback (utils/sweeps/entry.py)
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    if signum == signal.SIGINT:
        assert "sweep_toy: interrupted (SIGINT)" in log and record["exit_status"] == 130
    assert "running " + first.setting.id in out and "ticks" in out          # the console's progress line
    second = plan(path).settings[1]
    assert not (second.setting.folder / "sweep_record.json").exists()        # never started: still pending
    assert [item.state for item in plan(path).settings] == ["interrupted", "pending"]
    assert len(calls(workdir)) == 1
