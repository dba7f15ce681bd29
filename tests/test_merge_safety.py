"""merge_models.py under attack: crafted safetensors headers and indexes, outputs that overlap inputs,
concurrent runs, signals, leftovers, bounds, user errors (exit status 2, one line), no-op settings."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import merge_models
from utils.engine.reader import CheckpointError, CheckpointReader, SafetensorsFile

ROOT = Path(__file__).resolve().parents[1]


def _run(args, capsys=None):
    code = merge_models.main(args + ["--no_progress"])
    return code, (capsys.readouterr().err if capsys else "")


def _craft(path: Path, header, data: bytes) -> Path:
    """A safetensors file byte by byte: 8-byte little-endian header length, JSON header, data."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2]}


@pytest.mark.parametrize("header, data, message", [
    ([{"a": 1}], b"", "header is a JSON list, not an object"),
    ({"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), "tensor 'a': header entry must have dtype"),
    ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, bytes(8), "tensor 'a': header entry must have dtype"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "tensor 'a': header entry must have dtype"),
    ({"a": {**F32x2, "data_offsets": [-8, 0]}}, bytes(8), "tensor 'a': data_offsets must be two non-negative"),
    ({"a": {**F32x2, "data_offsets": [8, 0]}}, bytes(8), "tensor 'a': data_offsets [8, 0] are reversed"),
    ({"a": {**F32x2, "data_offsets": [0, 4]}}, bytes(4), "tensor 'a': data_offsets [0, 4] span 4 bytes but"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [4, 12]}}, bytes(12),
     "tensor 'b' (bytes 4..12) overlaps tensor 'a'"),
    # b's offsets point at a's bytes: b would be read as a's weights
    ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [0, 8]}}, bytes(8), "overlaps tensor"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [12, 20]}}, bytes(20),
     "tensor 'b' starts at byte 12, leaving a gap of 4 bytes after 'a'"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}}, bytes(16), "the tensors cover 8 bytes of a 16-byte data section"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "shape must be a list of non-negative"),
    ({"__metadata__": {"format": 1}, "a": {**F32x2, "data_offsets": [0, 8]}}, bytes(8), "__metadata__ must map"),
])
def test_crafted_headers_are_refused_naming_file_and_tensor(tmp_path, header, data, message):
    path = _craft(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError) as error:
        SafetensorsFile(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_the_safetensors_library_validates_every_file_too(tmp_path, monkeypatch):
    """Our checks first (they name the tensor), then safe_open's own parse: a file it refuses is refused."""
    import safetensors

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(2)}, good)
    opened = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda path, **kw: opened.append(path) or real(path, **kw))
    assert SafetensorsFile(good).read("a").tolist() == [1.0, 1.0] and opened == [str(good)]

    def refuse(path, **kw):
        raise safetensors.SafetensorError("Error while deserializing header: InvalidOffset(\"a\")")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    with pytest.raises(CheckpointError, match="good.safetensors: rejected by the safetensors library .*InvalidOffset"):
        SafetensorsFile(good)


def test_merge_of_a_crafted_file_exits_2_without_output(llama_family, tmp_path, capsys):
    """Before: a header whose offsets pointed at another tensor's bytes merged them as weights and exited 0."""
    broken = tmp_path / "broken"
    shutil.copytree(llama_family["ft0"], broken)
    raw = (broken / "model.safetensors").read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    query, key = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    header[key]["data_offsets"] = header[query]["data_offsets"]
    _craft(broken / "model.safetensors", header, raw[8 + length:])
    code, err = _run(["--base_model", str(llama_family["base"]), "--models", str(broken), "--method",
                      "task_arithmetic", "--output_dir", str(tmp_path / "out")], capsys)
    # k_proj's own bytes are now a gap, q_proj's are claimed twice: the first found is reported
    assert code == 2 and str(broken / "model.safetensors") in err and ("overlaps tensor" in err or "gap" in err)
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("index, message", [
    ("{not json", "model.safetensors.index.json: not valid JSON"),
    ('{"metadata": {}}', "model.safetensors.index.json: no weight_map"),
    ('[1, 2]', "model.safetensors.index.json: no weight_map"),
    ('{"weight_map": {"x": "../elsewhere.safetensors"}}', "tensor 'x' maps to '../elsewhere.safetensors'"),
    ('{"weight_map": {"a": "model.safetensors", "ghost": "model.safetensors"}}',
     "tensor 'ghost' is mapped to model.safetensors but that shard does not hold it"),
])
def test_invalid_index_is_refused(tmp_path, index, message):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError) as error:
        CheckpointReader(folder)
    assert message in str(error.value)


def test_tensor_in_two_shards_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "one.safetensors")
    save_file({"a": torch.zeros(2)}, folder / "two.safetensors")
    with pytest.raises(CheckpointError, match="tensor 'a' is in both one.safetensors and two.safetensors"):
        CheckpointReader(folder)


# ---------------------------------------------------------------- outputs that overlap inputs (8.2.a)

def _user_copy(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    (folder / "my_notes.txt").write_text("mine")
    return folder


@pytest.mark.parametrize("where", ["base", "model", "inside_model", "parent_of_base", "files_from"])
def test_output_overlapping_an_input_is_refused_even_with_overwrite(llama_family, tmp_path, capsys, where):
    base = _user_copy(llama_family["base"], tmp_path / "inputs" / "base")
    model = _user_copy(llama_family["ft0"], tmp_path / "inputs" / "ft0")
    donor = _user_copy(llama_family["ft1"], tmp_path / "donor")
    output = {"base": base, "model": model, "inside_model": model / "merged", "parent_of_base": tmp_path / "inputs",
              "files_from": donor}[where]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, err = _run(["--base_model", str(base), "--models", str(model), "--method", "task_arithmetic",
                      "--files_from", str(donor), "--output_dir", str(output), "--overwrite"], capsys)
    assert code == 2 and "overlaps the" in err and "choose another --output_dir" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (model / "merged").exists()


def test_output_given_through_a_link_to_an_input_is_refused(llama_family, tmp_path, capsys):
    model = _user_copy(llama_family["ft0"], tmp_path / "ft0")
    (tmp_path / "alias").symlink_to(model)
    code, err = _run(["--base_model", str(llama_family["base"]), "--models", str(model), "--method",
                      "task_arithmetic", "--output_dir", str(tmp_path / "alias"), "--overwrite"], capsys)
    assert code == 2 and "overlaps the model 0 input" in err and (model / "my_notes.txt").exists()


# ---------------------------------------------------------------- processes: concurrency, signals, leftovers

@pytest.fixture(scope="module")
def big_family(tmp_path_factory) -> dict[str, Path]:
    """Base + 2 models of 8 tensors of 512x1024 float32 (16 MiB each): a merge takes long enough to be
    stopped while its staging folder exists."""
    root = tmp_path_factory.mktemp("big")
    generator = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(512, 1024, generator=generator) for i in range(8)}
    folders = {}
    for name, scale in (("base", 0.0), ("ft0", 0.01), ("ft1", 0.02)):
        folder = root / name
        folder.mkdir()
        save_file({k: v + scale * torch.randn(v.shape, generator=generator) for k, v in base.items()},
                  folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"model_type": "toy", "dtype": "float32"}))
        folders[name] = folder
    return folders


def _merge_process(family, output: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "merge_models.py"), "--base_model", str(family["base"]), "--models",
               str(family["ft0"]), str(family["ft1"]), "--method", "task_arithmetic", "--drop_rate", "0.5",
               "--threads", "1", "--no_progress", "--output_dir", str(output), *extra]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop_while_staging(process: subprocess.Popen, output: Path) -> Path:
    """Wait until the process has created its staging folder, then SIGSTOP it there."""
    staging = output.parent / f".{output.name}.partial-{process.pid}"
    deadline = time.time() + 120
    while not staging.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the merge never created its staging folder"
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGSTOP)
    assert staging.exists() and not output.exists(), "the merge finished before it could be stopped"
    return staging


def test_sigterm_removes_the_staging_folder_and_exits_143(big_family, tmp_path):
    output = tmp_path / "merged"
    process = _merge_process(big_family, output)
    staging = _stop_while_staging(process, output)
    os.kill(process.pid, signal.SIGTERM)
    os.kill(process.pid, signal.SIGCONT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "interrupted (terminated by signal 15); nothing was written to" in err and "Traceback" not in err
    assert not staging.exists() and not output.exists() and list(tmp_path.iterdir()) == []


def test_staging_folders_of_killed_runs_are_removed_by_the_next_run(big_family, tmp_path, capsys):
    output = tmp_path / "merged"
    process = _merge_process(big_family, output)
    staging = _stop_while_staging(process, output)
    process.kill()                                  # SIGKILL: nothing can clean up
    process.communicate(timeout=60)
    assert staging.exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        alive = tmp_path / f".merged.partial-{sleeper.pid}"    # a live process's staging folder is left alone
        alive.mkdir()
        code, _ = _run(["--base_model", str(big_family["base"]), "--models", str(big_family["ft0"]), "--method",
                        "task_arithmetic", "--output_dir", str(output)])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert code == 0 and not staging.exists() and alive.exists()
    assert (output / "model.safetensors").exists()


def test_a_folder_appearing_meanwhile_is_not_replaced(big_family, tmp_path, capsys):
    """Two merges into one new output: the one that publishes second must not replace the first's folder."""
    output = tmp_path / "merged"
    first = _merge_process(big_family, output, "--seed", "1")
    _stop_while_staging(first, output)
    code, _ = _run(["--base_model", str(big_family["base"]), "--models", str(big_family["ft0"]), str(big_family["ft1"]),
                    "--method", "task_arithmetic", "--drop_rate", "0.5", "--seed", "2", "--output_dir", str(output)])
    assert code == 0
    written = (output / "model.safetensors").read_bytes()
    os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 2
    assert f"merge_models.py: error: {output} appeared while this run was writing; not replaced" in err
    assert (output / "model.safetensors").read_bytes() == written
    assert json.loads((output / "merge_manifest.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_two_merges_started_together_one_wins_one_is_refused(big_family, tmp_path):
    output = tmp_path / "merged"
    processes = [_merge_process(big_family, output, "--seed", str(seed)) for seed in (1, 2)]
    results = [(p.returncode, p.communicate(timeout=300)[1]) for p in processes]
    results = [(p.returncode, err) for p, (_, err) in zip(processes, results)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = [seed for seed, (code, _) in zip((1, 2), results) if code == 0][0]
    loser_err = [err for code, err in results if code == 2][0]
    assert "appeared while this run was writing; not replaced" in loser_err \
        or "already exists; pass --overwrite" in loser_err
    assert json.loads((output / "merge_manifest.json").read_text())["seed"] == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# ---------------------------------------------------------------- one exit status for bad input (8.2.d, f)

def _base_args(family, output):
    return ["--base_model", str(family["base"]), "--models", str(family["ft0"]), str(family["ft1"]),
            "--output_dir", str(output)]


@pytest.mark.parametrize("extra, message", [
    (["--method", "average_merging", "--weights", "1", "-1"],
     "average_merging: the model weights [1.0, -1.0] sum to 0 (the merge divides by their sum)"),
    (["--method", "task_arithmetic", "--exclude_param_names_regex", "model.(layers"],
     "invalid exclude regex 'model.(layers': missing ), unterminated subpattern at position 6"),
    (["--method", "task_arithmetic", "--device", "tpu0"], "unknown device 'tpu0' (use cpu, cuda, cuda:N or auto)"),
    (["--method", "task_arithmetic", "--threads", "0"], "threads must be at least 1, got 0"),
    (["--method", "task_arithmetic", "--weights", "1", "2", "3"], "weights: got 3 values for 2 models"),
    (["--method", "dare"], "dare takes 1..1 models, got 2"),
])
def test_user_errors_exit_2_with_one_line_before_reading(llama_family, tmp_path, capsys, monkeypatch, extra,
                                                         message):
    import utils.engine.streaming as engine

    monkeypatch.setattr(engine, "CheckpointReader", lambda *a, **k: pytest.fail("read before the checks"))
    code, err = _run(_base_args(llama_family, tmp_path / "out") + extra, capsys)
    assert code == 2 and err == f"merge_models.py: error: {message}\n"
    assert "while merging tensor" not in err and not (tmp_path / "out").exists()


def test_needs_a_base_is_reported_before_anything_is_read(tmp_path, capsys):
    code, err = _run(["--models", str(tmp_path / "a"), str(tmp_path / "b"), "--method", "ties_merging",
                      "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and err == "merge_models.py: error: ties_merging needs a base (pretrained) model\n"


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_max_shard_size_must_be_positive(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        merge_models.main(["--models", "a", "--method", "linear", "--output_dir", str(tmp_path / "o"),
                           "--max_shard_size_gb", value])
    assert exit_info.value.code == 2 and f"must be > 0, got {value}" in capsys.readouterr().err


def test_too_many_threads_are_clamped_with_a_message(llama_family, tmp_path, capsys):
    code, err = _run(_base_args(llama_family, tmp_path / "out") + ["--method", "average_merging", "--threads", "1000000"],
                     capsys)
    from utils.engine.streaming import available_cpus

    assert code == 0
    assert f"warning: 1000000 threads requested, {available_cpus()} CPUs available: using {available_cpus()}" in err


def test_file_system_errors_exit_2_with_one_line(llama_family, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = _run(_base_args(llama_family, blocker / "merged") + ["--method", "average_merging"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.endswith("; nothing was written\n")
    assert err.startswith(("merge_models.py: error: File exists: ", "merge_models.py: error: Not a directory: "))
    import errno
    import utils.records as records

    def read_only(*args, **kwargs):   # what a read-only or immutable folder answers
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "ro"))

    monkeypatch.setattr(records.Path, "mkdir", read_only)
    code, err = _run(_base_args(llama_family, tmp_path / "ro" / "merged") + ["--method", "average_merging"], capsys)
    assert code == 2
    assert err == f"merge_models.py: error: Read-only file system: {tmp_path / 'ro'}; nothing was written\n"


# ---------------------------------------------------------------- no silent no-ops (13.3)

@pytest.mark.parametrize("extra, flag", [
    (["--method", "ties_merging"], "set --density below 1"),
])
def test_noop_settings_warn_once_naming_the_flag(llama_family, tmp_path, capsys, extra, flag):
    code, err = _run(_base_args(llama_family, tmp_path / "out") + extra, capsys)
    assert code == 0 and err.count("merge_models.py: warning:") == 1 and flag in err


def test_single_model_dare_without_rate_warns(llama_family, tmp_path, capsys):
    code, err = _run(["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]), "--method",
                      "dare", "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 0 and err.count("warning:") == 1 and "set --drop_rate" in err


def test_effective_settings_do_not_warn(llama_family, tmp_path, capsys):
    for method, extra in (("ties", ["--density", "0.5"]), ("dare_linear", ["--density", "0.5"]),
                          ("ties_merging", ["--density", "0.5", "--drop_rate", "0.3"]), ("task_arithmetic", [])):
        code, err = _run(_base_args(llama_family, tmp_path / method) + ["--method", method, *extra], capsys)
        assert code == 0 and "warning" not in err, (method, err)


# ---------------------------------------------------------------- fast help (13.5)

def test_help_and_argument_errors_need_no_torch():
    """--help and argument errors are answered before torch (5-8 s to import here) is loaded."""
    probe = ("import sys, merge_models\n"
             "for argv in (['--help'], ['--models', 'a', '--method', 'nope', '--output_dir', 'o'],\n"
             "             ['--output_dir', 'o'], ['--from_manifest', 'm', '--output_dir', 'o', '--seed', '3']):\n"
             "    try:\n        merge_models.main(argv)\n    except SystemExit as e:\n        assert e.code in (0, 2)\n"
             "print('torch' in sys.modules, 'transformers' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "False False", result.stderr
    assert "the following arguments are required: --models, --method (or --from_manifest)" in result.stderr
    assert "--from_manifest re-runs the recorded merge; it does not take --seed" in result.stderr


def test_help_prints_each_default_once_and_every_flag_has_help():
    parser = merge_models.build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: [])" not in text and "9223372036854775807" not in text
    for action in parser._actions:
        assert action.help, action.dest
        rendered = parser._get_formatter()._expand_help(action) if action.help else ""
        assert rendered.count("(default") <= 1, action.dest
    assert "--seed SEED" in text and "(default: 0)" in text
