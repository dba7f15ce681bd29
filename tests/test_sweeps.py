"""Sweeps (utils/sweeps, scripts/sweep.py) on a tiny entry script (tests/sweep_toy.py): expansion, stable ids,
flag checks by the script's parser, resume, failures, batching, and the submitit and Ray launchers."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from utils.sweeps import RunOptions, SlurmOptions, SweepError, expand, load_spec, plan, run, setting_id, status_text
from utils.sweeps.driver import product_blocks
from utils.sweeps.launchers import check_ray_address

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """Current directory = tmp_path; tests/ on the children's PYTHONPATH (sweep_toy.py lives there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    return tmp_path


def sweep_file(folder: Path, **overrides) -> Path:
    spec = {"name": "toy", "script": "sweep_toy.py", "output_root": "out", "fixed": {"save_dir": "res", "loud": True},
            "axes": {"x": [1.0, 2.0, 3.0]}, "seeds": [0, 1]}
    spec.update(overrides)
    path = folder / f"{spec['name']}.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def calls(folder: Path) -> list[dict]:
    path = folder / "res" / "calls.txt"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def sweep_main():
    spec = importlib.util.spec_from_file_location("sweep_script", REPO / "scripts" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_expansion_cross_zip_range_seeds_exclude_and_stable_ids(tmp_path):
    path = sweep_file(tmp_path, axes={"x": {"start": 0.5, "stop": 1.6, "step": 0.5},
                                      "variant": {"labels": ["A", "B"], "zip": {"mode": ["a", "b"], "loud": [True, False]}}},
                      fixed={"save_dir": "res"}, exclude=[{"x": 1.5, "variant": "B"}])
    settings = expand(load_spec(path))
    # x ∈ {0.5, 1.0, 1.5} × variant ∈ {A, B} × seeds {0, 1}, minus (x = 1.5, B) × 2 seeds
    assert len(settings) == 3 * 2 * 2 - 2
    points = [(s.flags["x"], s.flags["mode"], s.flags["loud"], s.flags["seed"]) for s in settings]
    assert points[:4] == [(0.5, "a", True, 0), (0.5, "a", True, 1), (0.5, "b", False, 0), (0.5, "b", False, 1)]
    assert (1.5, "b", False, 0) not in points and (1.5, "a", True, 1) in points
    assert settings[2].labels == {"variant": "B"} and settings[2].varying == {"x": 0.5, "variant": "B", "seed": 0}
    assert len({s.id for s in settings}) == len(settings) and all(len(s.id) == 12 for s in settings)
    assert all(s.folder == Path("out") / s.id for s in settings)
    # the id hashes the script and the flags only: key order and the sweep's other fields do not matter
    first = settings[0]
    assert first.id == setting_id("sweep_toy.py", dict(reversed(list(first.flags.items()))))
    assert first.id != setting_id("other.py", first.flags)
    again = expand(load_spec(sweep_file(tmp_path, name="renamed", axes={"x": [0.5]}, fixed={"save_dir": "res", "mode": "a", "loud": True})))
    assert again[0].id == first.id
    assert first.argv() == ["--save_dir", "res", "--x", "0.5", "--mode", "a", "--loud", "--seed", "0"]


@pytest.mark.parametrize("overrides, message", [
    ({"axes": {"x": []}}, "axis 'x' is empty"),
    ({"axes": {"x": [1.0]}, "output": "{save_dir}"}, "collide on output folder"),
    ({"axes": {"x": [1.0, 1.0]}}, "their flags are identical"),
    ({"axes": {"save_dir": ["a", "b"]}}, "both fixed and varied"),
    ({"axes": {"v": {"zip": {"x": [1, 2], "mode": ["a"]}}}}, "zipped lists differ in length"),
    ({"exclude": [{"nothing": 1}]}, "which no axis varies"),
    ({"script": "../evil.py"}, "entry script at the repository root"),
    ({"batch": {"x": "xs"}, "output_flag": "save_dir", "fixed": {}}, "batch and output_flag cannot be combined"),
])
def test_bad_sweep_files_are_reported(tmp_path, overrides, message):
    with pytest.raises(SweepError, match=message):
        expand(load_spec(sweep_file(tmp_path, **overrides)))


def test_flags_are_checked_by_the_scripts_own_parser(workdir):
    with pytest.raises(SweepError, match=r"sweep_toy.py has no flag --wrong_flag \(its flags: .*fail_at"):
        plan(sweep_file(workdir, axes={"wrong_flag": [1, 2]}))
    with pytest.raises(SweepError, match="rejects its flags: .*invalid choice: 'c'"):
        plan(sweep_file(workdir, axes={"mode": ["a", "c"]}))
    with pytest.raises(SweepError, match="--loud of sweep_toy.py is a switch"):
        plan(sweep_file(workdir, fixed={"loud": "yes"}))
    assert not (workdir / "out").exists()  # nothing was launched


def test_resume_skips_done_settings_and_reruns_changed_ones(workdir, capsys):
    path = sweep_file(workdir)
    result = run(path, RunOptions(workers=1))
    assert result.counts() == {"done": 6, "failed": 0, "pending": 0, "running": 0, "interrupted": 0}
    assert len(calls(workdir)) == 6
    record = json.loads((result.settings[0].setting.folder / "sweep_record.json").read_text())
    assert record["status"] == "done" and record["exit_status"] == 0 and record["resolved_config"]["x"] == 1.0
    assert record["resolved_config"]["fail_at"] is None  # defaults are part of the resolved config
    assert json.loads((workdir / "res" / "toy_x2.0_seed1_a.json").read_text())["value"] == 21.0

    run(path, RunOptions(workers=1))
    assert len(calls(workdir)) == 6  # everything was done: nothing ran
    # a changed flag gives a new setting (new id), which runs; the old records stay as they are
    changed = sweep_file(workdir, axes={"x": [1.0, 2.0, 4.0]})
    run(changed, RunOptions(workers=2))
    assert len(calls(workdir)) == 8 and {c["xs"][0] for c in calls(workdir)[6:]} == {4.0}
    # the same setting with a changed resolved config (here: the script's default of --mode, via the
    # record) is not done any more
    target = result.settings[0].setting.folder / "sweep_record.json"
    record["resolved_config"]["mode"] = "b"
    target.write_text(json.dumps(record))
    assert "1 of the pending done with a different resolved config" in status_text(plan(path))
    run(path, RunOptions(workers=1))
    assert len(calls(workdir)) == 9
    run(path, RunOptions(workers=1, force=True))
    assert len(calls(workdir)) == 15


def test_a_failing_setting_is_recorded_and_the_others_run(workdir, capsys):
    path = sweep_file(workdir, fixed={"save_dir": "res", "fail_at": 2.0})
    assert sweep_main()(["run", str(path), "--workers", "2"]) == 1
    result = plan(path)
    assert result.counts() == {"done": 4, "failed": 2, "pending": 0, "running": 0, "interrupted": 0}
    failed = [item for item in result.settings if item.state == "failed"]
    assert {item.setting.flags["x"] for item in failed} == {2.0}
    assert failed[0].record["exit_status"] == 3 and "failing on purpose at x = 2.0" in failed[0].record["error"]
    capsys.readouterr()
    assert sweep_main()(["status", str(path)]) == 0
    text = capsys.readouterr().out
    assert "6 settings: 4 done, 0 running, 0 pending, 2 failed, 0 interrupted" in text and "exit status 3" in text and "failing on purpose" in text
    # fixing the cause reruns only the failed settings
    path.write_text(path.read_text().replace("fail_at: 2.0", "fail_at: 9.0"))
    before = len(calls(workdir))
    run(path, RunOptions(workers=1))
    assert plan(path).counts()["done"] == 6 and len(calls(workdir)) == before + 6  # fail_at changed every id


def test_batch_runs_settings_of_one_call_and_resumes_partially(workdir):
    path = sweep_file(workdir, axes={"x": [1.0, 2.0, 3.0], "mode": ["a", "b"]}, batch={"x": "xs", "seed": "seeds"})
    result = run(path, RunOptions(workers=1, dry_run=True))
    assert calls(workdir) == []
    run(path, RunOptions(workers=1))
    assert sorted((c["mode"], tuple(c["xs"]), tuple(c["seeds"])) for c in calls(workdir)) == [
        ("a", (1.0, 2.0, 3.0), (0, 1)), ("b", (1.0, 2.0, 3.0), (0, 1))]
    result = plan(path)
    assert result.counts()["done"] == 12
    assert all(item.record["block_size"] == 6 for item in result.settings)
    # remove two records of mode a: the rerun covers exactly the missing ones
    for item in result.settings:
        if item.setting.flags["mode"] == "a" and item.setting.flags["x"] == 2.0:
            (item.setting.folder / "sweep_record.json").unlink()
    run(path, RunOptions(workers=1))
    assert calls(workdir)[-1] == {"xs": [2.0], "seeds": [0, 1], "mode": "a"}
    assert plan(path).counts()["done"] == 12


def test_product_blocks_partition_exactly():
    points = [(1, "a"), (1, "b"), (2, "a"), (2, "b"), (3, "a")]
    blocks = product_blocks(points, 2)
    covered = [(x, y) for xs, ys in blocks for x in xs for y in ys]
    assert sorted(covered) == sorted(points) and len(covered) == len(points)
    assert sorted(blocks) == [[[1, 2], ["a", "b"]], [[3], ["a"]]]


def test_submitit_debug_and_local_executors(workdir):
    pytest.importorskip("submitit")
    path = sweep_file(workdir, axes={"x": [1.0, 2.0]}, seeds=[0], fixed={"save_dir": "res", "fail_at": 2.0})
    result = run(path, RunOptions(launcher="slurm", slurm=SlurmOptions(cluster="debug")))
    assert result.counts() == {"done": 1, "failed": 1, "pending": 0, "running": 0, "interrupted": 0}
    path2 = sweep_file(workdir, name="toy2", output_root="out2", axes={"x": [3.0, 4.0]}, seeds=[0])
    result = run(path2, RunOptions(launcher="slurm", slurm=SlurmOptions(cluster="local", wait=True, timeout_min=5)))
    assert result.counts() == {"done": 2, "failed": 0, "pending": 0, "running": 0, "interrupted": 0}
    assert (workdir / "out2" / ".submitit").is_dir() and (workdir / "res" / "toy_x4.0_seed0_a.json").is_file()


def test_missing_submitit_is_named(workdir, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(SweepError, match="needs the Python package 'submitit'"):
        run(sweep_file(workdir), RunOptions(launcher="slurm"))


def test_unreachable_ray_address_is_an_error():
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(SweepError, match=f"Ray address '127.0.0.1:{port}' cannot be reached"):
        check_ray_address(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(SweepError, match="is not host:port"):
        check_ray_address("nonsense")


def test_ray_local_cluster(workdir):
    pytest.importorskip("ray")
    path = sweep_file(workdir, axes={"x": [1.0, 2.0]}, seeds=[0], fixed={"save_dir": "res", "fail_at": 2.0})
    result = run(path, RunOptions(launcher="ray", ray_local_cpus=1))
    assert result.counts() == {"done": 1, "failed": 1, "pending": 0, "running": 0, "interrupted": 0}
    assert (workdir / "res" / "toy_x1.0_seed0_a.json").is_file()


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yml")), ids=lambda p: p.stem)
def test_shipped_sweeps_expand_and_pass_their_scripts_parsers(path, tmp_path):
    """Every shipped sweep is valid: its flags are the script's, its settings do not collide, its batches exist."""
    result = plan(path, output_root=tmp_path)
    assert result.counts()["pending"] == len(result.settings) > 0
    from utils.sweeps.driver import make_blocks

    blocks = make_blocks(result.spec, result.settings, str(tmp_path))
    assert sum(len(block.settings) for block in blocks) == len(result.settings)
    if path.stem == "minilm_mrpc_drop":  # 8 rates × 3 seeds × 3 variants, p = 0 once: 3 calls
        assert len(result.settings) == 66 and len(blocks) == 3


def test_set_overrides_fixed_flags(workdir):
    from utils.sweeps import parse_overrides

    path = sweep_file(workdir)
    overrides = parse_overrides(["mode=b", "save_dir=elsewhere", "fail_at=null"])
    assert overrides == {"mode": "b", "save_dir": "elsewhere", "fail_at": None}
    result = plan(path, overrides=overrides)
    assert all(item.resolved_config["mode"] == "b" and item.resolved_config["save_dir"] == "elsewhere" for item in result.settings)
    assert {item.setting.id for item in result.settings}.isdisjoint({item.setting.id for item in plan(path).settings})
    with pytest.raises(SweepError, match="expected flag=value"):
        parse_overrides(["--mode b"])
    with pytest.raises(SweepError, match="both fixed and varied"):
        plan(path, overrides={"x": 1.0})


def test_output_flag_gives_each_setting_its_folder(workdir):
    path = sweep_file(workdir, fixed={}, output_flag="save_dir", output="x{x}_seed{seed}", axes={"x": [1.0, 2.0]}, seeds=[0])
    result = run(path, RunOptions(workers=1))
    assert result.counts()["done"] == 2
    for x in (1.0, 2.0):
        folder = workdir / "out" / f"x{x}_seed0"
        assert (folder / "sweep_record.json").is_file() and (folder / "output" / f"toy_x{x}_seed0_a.json").is_file()
        assert json.loads((folder / "sweep_record.json").read_text())["resolved_config"]["save_dir"] == \
            str(Path("out") / f"x{x}_seed0" / "output")


def test_slurm_choices_fill_from_the_sweep_files_section(workdir):
    """A parameter not chosen on the command line comes from the sweep's `slurm:` section, else its defaults."""
    spec = load_spec(sweep_file(workdir, slurm={"partition": "gpu", "timeout_min": 30, "mem_gb": 16}))
    resolved = SlurmOptions(timeout_min=5, cluster="local").over(spec.slurm)
    assert (resolved.partition, resolved.timeout_min, resolved.mem_gb) == ("gpu", 5, 16)
    assert (resolved.cpus_per_task, resolved.gpus_per_node, resolved.array_parallelism) == (4, 0, 64)
    assert (resolved.cluster, resolved.additional_parameters) == ("local", {})
