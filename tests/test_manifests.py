"""One manifest for every path (utils/manifest.py): merges from flags and recipes, MoE builds, the task-vector
analysis, LoRA extraction and LoRA merges all record the time, the project's commit, the library versions
and each input by absolute folder and file sha256; model folders copy only what a model needs from their
donor (no input's own records); the file-hash cache stays bounded."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import yaml

import analyze_task_vectors
import extract_lora
import merge_lora
import merge_models
import merge_moe
from tests.recipe_helpers import build_models

ROOT = Path(__file__).resolve().parents[1]
RECORDS = {"conversion.json": '{"converted_from": "a gguf file"}', "merge_manifest.json": '{"tool": "stale"}',
           "README.md": "# the donor's card", "notes.txt": "the donor's notes"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """models/{base,chat,code,chatml}; the base (every output's donor) also holds records of its own."""
    folders = build_models(tmp_path_factory.mktemp("manifests"))
    for name, text in RECORDS.items():
        (folders["base"] / name).write_text(text)
    return folders


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_common(manifest: dict, tool: str, expected: dict[str, Path]) -> None:
    """The fields every manifest starts with, and each input (role → folder) by absolute path and sha256."""
    assert manifest["tool"] == tool and manifest["manifest_version"] == 3
    assert datetime.fromisoformat(manifest["created"]).tzinfo is not None
    assert manifest["versions"]["torch"] and manifest["project"]["version"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert manifest["project"]["git_commit"] == head.stdout.strip()
    assert manifest["wall_seconds"] >= 0
    recorded = {entry["role"]: entry for entry in manifest["inputs"]}
    assert set(recorded) == set(expected)
    for role, folder in expected.items():
        entry = recorded[role]
        assert Path(entry["path"]).is_absolute() and entry["path"] == str(folder.resolve())
        assert {f["file"]: f["sha256"] for f in entry["files"]} == {
            p.name: _sha256(p) for p in folder.glob("*.safetensors")}


def test_recipe_manifest_records_each_input_file_sha256_and_copies_no_input_records(models, tmp_path, monkeypatch):
    """Before: header hashes only (the same for three different inputs), relative paths, and the donor's
    conversion.json copied into the output."""
    monkeypatch.chdir(models["base"].parent.parent)    # the recipe names its models relative to the cwd
    recipe = tmp_path / "ties.yml"
    shutil.copyfile(ROOT / "configs" / "recipes" / "ties.yml", recipe)
    assert merge_models.main(["--config", str(recipe), "--output_dir", str(tmp_path / "out"), "--no_progress"]) == 0
    manifest = json.loads((tmp_path / "out" / "merge_manifest.json").read_text())
    _check_common(manifest, "merge_models --config (recipe, streaming engine)",
                  {"models/base": models["base"], "models/chat": models["chat"], "models/code": models["code"]})
    digests = [entry["files"][0]["sha256"] for entry in manifest["inputs"]]
    assert len(set(digests)) == 3
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert "conversion.json" not in written and "notes.txt" not in written
    assert manifest["tool"] != "stale" and "the donor's card" not in (tmp_path / "out" / "README.md").read_text()
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= written
    assert {"conversion.json", "notes.txt"} <= set(manifest["output"]["model_files"]["not_copied"])


def test_flag_merge_manifest_and_files(models, tmp_path):
    out = tmp_path / "out"
    assert merge_models.main(["--base_model", str(models["base"]), "--models", str(models["chat"]),
                              str(models["code"]), "--method", "task_arithmetic", "--output_dir", str(out),
                              "--no_progress"]) == 0
    manifest = json.loads((out / "merge_manifest.json").read_text())
    _check_common(manifest, "merge_models (streaming executor)",
                  {"base": models["base"], "model 0": models["chat"], "model 1": models["code"]})
    assert not {"conversion.json", "notes.txt"} & {p.name for p in out.iterdir()}
    assert json.loads((out / "merge_manifest.json").read_text())["tool"] != "stale"


def test_moe_manifest(models, tmp_path):
    config = {"base_model": str(models["base"]), "gate_mode": "random", "experts_per_token": 1,
              "experts": [{"source_model": str(models["chat"])}, {"source_model": str(models["code"])}]}
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(config))
    assert merge_moe.main([str(tmp_path / "moe.yml"), "--output_dir", str(tmp_path / "moe"), "--no_progress"]) == 0
    manifest = json.loads((tmp_path / "moe" / "merge_manifest.json").read_text())
    _check_common(manifest, "merge_moe",
                  {"base_model": models["base"], "experts[0]": models["chat"], "experts[1]": models["code"]})
    assert manifest["config_file"] == str((tmp_path / "moe.yml").resolve())
    assert "conversion.json" not in {p.name for p in (tmp_path / "moe").iterdir()}


def test_analysis_manifest(models, tmp_path):
    out = tmp_path / "analysis"
    assert analyze_task_vectors.main(["--base_model", str(models["base"]), "--models", str(models["chat"]),
                                      str(models["code"]), "--output_dir", str(out), "--no_figures",
                                      "--no_progress"]) == 0
    analysis = json.loads((out / "analysis.json").read_text())
    _check_common(analysis, "analyze_task_vectors",
                  {"base": models["base"], "model chat": models["chat"], "model code": models["code"]})
    assert analysis["models"][0]["files"][0]["sha256"] == _sha256(models["chat"] / "model.safetensors")


def test_lora_extract_and_merge_manifests(models, tmp_path):
    adapter = tmp_path / "lora"
    assert extract_lora.main(["--base", str(models["base"]), "--model", str(models["chat"]), "--output_dir",
                              str(adapter), "--rank", "4", "--non_lora", "skip"]) == 0
    report = json.loads((adapter / "extract_report.json").read_text())
    _check_common(report, "extract_lora", {"base": models["base"], "model": models["chat"]})
    merged = tmp_path / "merged_lora"
    assert merge_lora.main(["--adapters", str(adapter), str(adapter), "--weights", "0.5", "0.5",
                            "--output_dir", str(merged)]) == 0
    record = json.loads((merged / "merge_lora.json").read_text())
    _check_common(record, "merge_lora", {"adapter 0": adapter, "adapter 1": adapter})


def test_hash_cache_is_bounded_least_recently_used_first(tmp_path, monkeypatch):
    import utils.manifest as manifest

    monkeypatch.setenv("MERGELM_HASH_CACHE", str(tmp_path / "cache.json"))
    monkeypatch.setattr(manifest, "HASH_CACHE_ENTRIES", 3)
    files = []
    for index in range(5):
        path = tmp_path / f"f{index}.bin"
        path.write_bytes(bytes([index]) * 100)
        files.append(path)
        manifest.remember_sha256({path: _sha256(path)})
    cache = json.loads((tmp_path / "cache.json").read_text())
    assert sorted(Path(name).name for name in cache) == ["f2.bin", "f3.bin", "f4.bin"]   # the 3 most recent
    manifest.remember_sha256({files[2]: _sha256(files[2])})      # f2 used again: f3 is now the oldest
    files[4].unlink()                                            # a deleted file's entry is dropped
    manifest.remember_sha256({files[0]: _sha256(files[0])})
    cache = json.loads((tmp_path / "cache.json").read_text())
    assert sorted(Path(name).name for name in cache) == ["f0.bin", "f2.bin", "f3.bin"]
    assert manifest.known_sha256(files[0]) == _sha256(files[0]) and manifest.known_sha256(files[1]) is None
    os.utime(files[0], ns=(1, 1))                                # a changed stat key: no longer known
    assert manifest.known_sha256(files[0]) is None


def test_a_hub_snapshot_input_is_recorded_with_its_repo_and_revision(tmp_path):
    from utils.manifest import input_record

    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"weights")
    entry = input_record("base", "HuggingFaceTB/SmolLM2-135M", snapshot, [snapshot / "model.safetensors"],
                         {snapshot / "model.safetensors": hashlib.sha256(b"weights").hexdigest()})
    assert entry["hub_repo"] == "HuggingFaceTB/SmolLM2-135M" and entry["hub_revision"] == "a" * 40
    assert entry["source"] == "HuggingFaceTB/SmolLM2-135M" and entry["path"] == str(snapshot.resolve())
    plain = input_record("base", "base/", tmp_path, [], {})
    assert "hub_repo" not in plain and plain["path"] == str(tmp_path.resolve())
