"""The merge manifest identifies its inputs' content and re-runs bit for bit (--from_manifest); the merged
folder holds only model files, a config stating the written dtype, and files with normal permissions."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from safetensors.torch import load_file

import merge_models

ROOT = Path(__file__).resolve().parents[1]


def _run(args, capsys=None):
    code = merge_models.main(args + ["--no_progress"])
    return code, (capsys.readouterr().err if capsys else "")


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "merge_manifest.json").read_text())


def _weight_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("model")}


def test_manifest_identifies_each_input_by_content(llama_family, tmp_path):
    out = tmp_path / "out"
    assert _run(["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]),
                 str(llama_family["ft1"]), "--method", "ties_merging", "--density", "0.5", "--output_dir", str(out)])[0] == 0
    manifest = _manifest(out)
    digests = []
    for entry, folder in zip(manifest["inputs"], ("base", "ft0", "ft1")):
        (file,) = entry["files"]
        path = llama_family[folder] / file["file"]
        assert file["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and file["bytes"] == path.stat().st_size
        digests.append(file["sha256"])
    assert len(set(digests)) == 3     # before: header_sha256 was the same for base and both fine-tunes
    assert datetime.fromisoformat(manifest["created"]).tzinfo is not None
    project = manifest["project"]
    assert project["version"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert project["git_commit"] == head.stdout.strip() and isinstance(project["git_dirty"], bool)


@pytest.mark.parametrize("method, extra, options, has_seed", [
    ("average_merging", [], {"weights"}, False),
    ("task_arithmetic", ["--drop_rate", "0.4"], {"weights", "scaling_coefficient"}, True),
    ("task_arithmetic", ["--drop_rate", "0.4", "--mask_strategy", "magnitude"], {"weights", "scaling_coefficient"},
     False),
    ("ties_merging", ["--density", "0.5"], {"weights", "scaling_coefficient", "density", "ties_trim",
                                            "ties_normalize"}, False),
    ("ties_merging", ["--density", "0.5", "--drop_rate", "0.5"], {"weights", "scaling_coefficient", "density",
                                                                  "ties_trim", "ties_normalize"}, True),
])
def test_manifest_records_only_the_options_that_apply(llama_family, tmp_path, method, extra, options, has_seed):
    models = [str(llama_family["ft0"])] if method == "slerp" else [str(llama_family["ft0"]), str(llama_family["ft1"])]
    out = tmp_path / "out"
    assert _run(["--base_model", str(llama_family["base"]), "--models", *models, "--method", method,
                 "--output_dir", str(out)] + extra)[0] == 0
    manifest = _manifest(out)
    assert set(manifest["options"]) == options and set(manifest["rerun"]["options"]) == options
    assert ("seed" in manifest) == has_seed and ("dare" in manifest) == ("drop_rate" in " ".join(extra)
                                                                       or method.startswith("dare"))
    assert "arguments" not in manifest


@pytest.mark.parametrize("method, extra", [
    ("average_merging", ["--weights", "0.3", "0.7", "--drop_rate", "0.5"]),
    ("task_arithmetic", ["--drop_rate", "0.3", "0.6", "--scaling_coefficient", "0.7", "--dtype", "bfloat16"]),
    ("ties_merging", ["--density", "0.4", "0.6", "--weights", "0.3", "0.7", "--ties_normalize", "weights"]),
    ("ties_merging", ["--density", "0.5", "--drop_rate", "0.5", "--rescale_mode", "l1", "--seed", "7"]),
    ("task_arithmetic", ["--drop_rate", "0.7", "--mask_strategy", "magnitude", "--max_shard_size_gb", "0.00001"]),
    ("norm_adaptive", ["--exclude_param_names_regex", ".*norm.*"]),
])
def test_from_manifest_reproduces_the_weights_bit_for_bit(llama_family, tmp_path, monkeypatch, method, extra):
    models = [str(llama_family["ft0"])] if method == "slerp" else [str(llama_family["ft0"]), str(llama_family["ft1"])]
    first = tmp_path / "first"
    assert _run(["--base_model", str(llama_family["base"]), "--models", *models, "--method", method,
                 "--seed", "3", "--output_dir", str(first)] + extra)[0] == 0
    monkeypatch.chdir(tmp_path)      # the manifest holds absolute input paths: it works from anywhere
    again = tmp_path / "again"
    assert _run(["--from_manifest", str(first / "merge_manifest.json"), "--output_dir", str(again)])[0] == 0
    assert _weight_bytes(first) == _weight_bytes(again) and len(_weight_bytes(first)) >= 1
    assert (first / "config.json").read_bytes() == (again / "config.json").read_bytes()
    assert _manifest(first)["inputs"] == _manifest(again)["inputs"]


def test_from_manifest_refuses_changed_inputs_naming_the_file(llama_family, tmp_path, capsys):
    model = tmp_path / "ft0"
    shutil.copytree(llama_family["ft0"], model)
    first = tmp_path / "first"
    assert _run(["--base_model", str(llama_family["base"]), "--models", str(model), "--method", "dare",
                 "--drop_rate", "0.5", "--output_dir", str(first)])[0] == 0
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01                 # one bit of one weight
    weights.write_bytes(bytes(data))
    code, err = _run(["--from_manifest", str(first / "merge_manifest.json"), "--output_dir", str(tmp_path / "again")],
                     capsys)
    assert code == 2 and f"model 0: {weights} has sha256" in err and "the inputs changed" in err
    assert not (tmp_path / "again").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["first", "ft0"]


def test_from_manifest_refuses_a_file_that_is_not_a_manifest(tmp_path, capsys):
    bad = tmp_path / "m.json"
    bad.write_text('{"tool": "something else"}')
    code, err = _run(["--from_manifest", str(bad), "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and f"{bad}: not a merge manifest of this version" in err
    bad.write_text("{")
    code, err = _run(["--from_manifest", str(bad), "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and f"{bad}: not valid JSON" in err


def test_only_model_files_are_copied_from_the_donor(llama_family, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(llama_family["base"], base)
    for name, text in {"conversion.json": "{}", "README.md": "# base", "tokenizer_config.json": "{}",
                       "tokenizer.json": "{}", "special_tokens_map.json": "{}", "chat_template.jinja": "{{ x }}",
                       "training_args.bin": "x", "notes.txt": "n"}.items():
        (base / name).write_text(text)
    (base / "runs").mkdir()
    out = tmp_path / "out"
    assert _run(["--base_model", str(base), "--models", str(llama_family["ft0"]), "--method", "task_arithmetic",
                 "--output_dir", str(out)])[0] == 0
    files = {p.name for p in out.iterdir()}
    assert files == {"config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
                     "special_tokens_map.json", "chat_template.jinja", "model.safetensors", "merge_manifest.json"}
    model_files = _manifest(out)["output"]["model_files"]
    assert model_files["from"] == str(base)
    assert model_files["not_copied"] == ["README.md", "conversion.json", "notes.txt", "runs/"]


def _set_config(folder: Path, **values) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("dtype_flag, written", [([], "float32"), (["--dtype", "bfloat16"], "bfloat16"),
                                                 (["--dtype", "float16"], "float16")])
def test_config_states_the_dtype_of_the_tensors_written(llama_family, tmp_path, dtype_flag, written):
    base = tmp_path / "base"
    shutil.copytree(llama_family["base"], base)
    _set_config(base, torch_dtype="float16", dtype="float16")     # a stale claim: the weights are float32
    out = tmp_path / "out"
    assert _run(["--base_model", str(base), "--models", str(llama_family["ft0"]), "--method", "task_arithmetic",
                 "--output_dir", str(out)] + dtype_flag)[0] == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == written and config["torch_dtype"] == written
    assert {str(t.dtype) for t in load_file(out / "model.safetensors").values()} == {f"torch.{written}"}


def test_written_files_have_normal_permissions(llama_family, tmp_path):
    from utils.records import write_json_atomic

    previous = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert _run(["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]), "--method",
                     "task_arithmetic", "--drop_rate", "0.2", "--output_dir", str(out),
                     "--max_shard_size_gb", "0.00001"])[0] == 0
        written = write_json_atomic(tmp_path / "records" / "result.json", {"a": 1})
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*out.iterdir(), written]}
    assert set(modes.values()) == {0o644}, modes        # before: write_text_atomic gave 0600
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_manifest_written_by_an_older_version_is_refused(tmp_path, capsys):
    legacy = {"tool": "merge_models (streaming engine)", "arguments": {}, "inputs": []}
    path = tmp_path / "merge_manifest.json"
    path.write_text(json.dumps(legacy))
    code, err = _run(["--from_manifest", str(path), "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "no usable rerun record" in err


def test_known_hashes_are_not_recomputed_and_changed_files_are(llama_family, tmp_path, monkeypatch):
    """A sweep over the same inputs hashes each file once (stat-keyed cache); a rewritten file is hashed again."""
    import utils.manifest as engine

    monkeypatch.setenv("MERGELM_HASH_CACHE", str(tmp_path / "cache.json"))
    model = tmp_path / "ft0"
    shutil.copytree(llama_family["ft0"], model)
    hashed = []
    real = engine.file_sha256
    monkeypatch.setattr(engine, "file_sha256",
                        lambda path, **kw: hashed.append(Path(path).parent.name) or real(path, **kw))
    args = ["--base_model", str(llama_family["base"]), "--models", str(model), "--method", "task_arithmetic"]
    assert _run(args + ["--output_dir", str(tmp_path / "one")])[0] == 0
    assert sorted(hashed) == ["base", "ft0"]
    assert _run(args + ["--output_dir", str(tmp_path / "two")])[0] == 0
    assert sorted(hashed) == ["base", "ft0"]          # nothing hashed again
    assert _manifest(tmp_path / "one")["inputs"] == _manifest(tmp_path / "two")["inputs"]
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert _run(args + ["--output_dir", str(tmp_path / "three")])[0] == 0
    assert sorted(hashed) == ["base", "ft0", "ft0"]
    assert _manifest(tmp_path / "three")["inputs"][1]["files"][0]["sha256"] == hashlib.sha256(bytes(data)).hexdigest()


def test_hub_cache_blobs_are_named_by_their_sha256(tmp_path):
    from utils.manifest import known_sha256

    content = b"weights"
    digest = hashlib.sha256(content).hexdigest()
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / digest).write_bytes(content)
    (tmp_path / "snapshots").mkdir()
    (tmp_path / "snapshots" / "model.safetensors").symlink_to(tmp_path / "blobs" / digest)
    assert known_sha256(tmp_path / "snapshots" / "model.safetensors") == digest
