"""End-to-end merge_models.py runs on tiny random Llama and BERT checkpoints, and its bad inputs."""
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import merge_models
from model_merging_methods import merge_state_dicts
from utils.engine.reader import CheckpointReader


def _weights(folder):
    return {name: CheckpointReader(folder).get(name) for name in CheckpointReader(folder).names()}


def _run(args, capsys=None):
    code = merge_models.main(args + ["--no_progress"])
    return code, (capsys.readouterr().err if capsys else "")


@pytest.mark.parametrize("method, extra", [
    ("average_merging", []), ("average_merging", ["--weights", "0.3", "0.7"]),
    ("task_arithmetic", ["--scaling_coefficient", "0.5", "--drop_rate", "0.9"]),
    ("ties_merging", ["--density", "0.5", "--scaling_coefficient", "0.8"]),
    ("task_arithmetic", ["--drop_rate", "0.7", "--weights", "0.5", "0.5"]),
    ("ties_merging", ["--drop_rate", "0.5", "--ties_normalize", "weights"]),
])
def test_streaming_merge_equals_in_memory_merge(llama_family, tmp_path, method, extra):
    out = tmp_path / "merged"
    code, _ = _run(["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]),
                    str(llama_family["ft1"]), "--method", method, "--output_dir", str(out), "--seed", "3"] + extra)
    assert code == 0
    args = merge_models.build_parser().parse_args(
        ["--models", "a", "--method", method, "--output_dir", "o"] + extra)
    job = merge_models.job_from_args(args)
    expected = merge_state_dicts(method, _weights(llama_family["base"]),
                                 [_weights(llama_family["ft0"]), _weights(llama_family["ft1"])],
                                 job.options, dare=job.dare, seed=3)
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == expected.keys()
    for name in expected:
        assert torch.equal(merged[name], expected[name]), name


def test_merged_llama_loads_and_generates_with_manifest(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    code, _ = _run(["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]),
                    str(llama_family["ft1"]), "--method", "ties_merging", "--drop_rate", "0.5", "--dtype",
                    "bfloat16", "--max_shard_size_gb", "0.000002", "--output_dir", str(out)])
    assert code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["method"]["name"] == "ties_merging" and manifest["seed"] == 0
    assert manifest["versions"]["torch"] == torch.__version__
    assert [i["role"] for i in manifest["inputs"]] == ["base", "model 0", "model 1"]
    assert len(manifest["inputs"][0]["files"][0]["sha256"]) == 64
    kept = manifest["dare"]["per_model"][0]
    assert 0.45 < kept["kept_fraction_overall"] < 0.55
    assert set(kept["kept_fraction"]) == set(index["weight_map"])
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tokens = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 7)
    assert not list(tmp_path.glob(".merged.partial-*"))


def test_bert_merge_excludes_by_regex_and_loads(bert_family, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "bert"
    code, _ = _run(["--base_model", str(bert_family["base"]), "--models", str(bert_family["ft0"]),
                    str(bert_family["ft1"]), "--method", "task_arithmetic", "--drop_rate", "0.9",
                    "--exclude_param_names_regex", ".*pooler.*", "--output_dir", str(out)])
    assert code == 0
    merged, base = _weights(out), _weights(bert_family["base"])
    assert torch.equal(merged["pooler.dense.weight"], base["pooler.dense.weight"])
    assert not torch.equal(merged["encoder.layer.0.attention.self.query.weight"],
                           base["encoder.layer.0.attention.self.query.weight"])
    AutoModel.from_pretrained(out)


def test_single_model_dare_and_slerp(llama_family, tmp_path):
    base, ft = _weights(llama_family["base"]), _weights(llama_family["ft0"])
    code, _ = _run(["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]),
                    "--method", "dare", "--drop_rate", "0.0", "--output_dir", str(tmp_path / "same")])
    assert code == 0
    same = _weights(tmp_path / "same")
    assert all(torch.allclose(same[n], ft[n], atol=1e-6) for n in ft)
    code, _ = _run(["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]),
                    "--method", "slerp", "--slerp_t", "1.0", "--output_dir", str(tmp_path / "slerp")])
    slerped = _weights(tmp_path / "slerp")
    assert code == 0 and all(torch.allclose(slerped[n], ft[n], atol=1e-5) for n in ft)
    assert not all(torch.equal(slerped[n], base[n]) for n in ft)


def test_vocab_alignment_pads_with_mean_rows(tmp_path):
    from conftest import save_tiny_llama

    base = save_tiny_llama(tmp_path / "base", 0, vocab_size=64)
    ft = save_tiny_llama(tmp_path / "ft", 1, base, vocab_size=65)
    common = ["--base_model", str(base), "--models", str(ft), "--method", "task_arithmetic", "--no_progress"]
    assert merge_models.main(common + ["--output_dir", str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused").exists()
    assert merge_models.main(common + ["--vocab_alignment", "pad_mean", "--output_dir", str(tmp_path / "ok")]) == 0
    merged, base_w, ft_w = _weights(tmp_path / "ok"), _weights(base), _weights(ft)
    embed = "model.embed_tokens.weight"
    assert merged[embed].shape == (65, 16)
    # θ = θ_pre' + (θ_ft − θ_pre') = θ_ft, with θ_pre' row 64 = mean of the base's rows
    assert torch.allclose(merged[embed], ft_w[embed], atol=1e-6)
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["vocab_size"] == 65
    code = merge_models.main(["--base_model", str(base), "--models", str(ft), "--method", "dare",
                              "--drop_rate", "0.99", "--vocab_alignment", "pad_mean", "--no_progress",
                              "--output_dir", str(tmp_path / "dropped")])
    dropped = _weights(tmp_path / "dropped")[embed]
    assert code == 0
    pad_mean = base_w[embed].mean(0)
    # with 99% of the delta dropped most of row 64 is back at the mean of the base rows
    assert (dropped[64] == pad_mean).float().mean() > 0.8


def _corrupt_nan(folder):
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, folder / "model.safetensors")


def _truncate(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop_tensor(folder):
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _reshape_tensor(folder):
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(8)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("break_model, extra, message", [
    (_reshape_tensor, [], "shape mismatch for 'model.norm.weight'"),
    (_drop_tensor, [], "'model.layers.1.mlp.up_proj.weight' is missing from model 0"),
    (_corrupt_nan, [], "'model.norm.weight' of model 0 contains NaN"),
    (_truncate, [], "truncated safetensors file"),
])
def test_bad_inputs_fail_cleanly(llama_family, tmp_path, capsys, break_model, extra, message):
    broken = tmp_path / "broken"
    shutil.copytree(llama_family["ft0"], broken)
    if break_model:
        break_model(broken)
    out = tmp_path / "out"
    code, err = _run(["--base_model", str(llama_family["base"]), "--models", str(broken), "--method",
                      "task_arithmetic", "--output_dir", str(out)] + extra, capsys)
    assert code == 2
    assert message in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("rates, message", [
    (["1.0"], "drop rate must be in [0, 1), got 1.0"), (["0.5", "-0.1"], "drop rate must be in [0, 1), got -0.1"),
])
def test_drop_rate_outside_range_is_refused_by_the_parser(tmp_path, capsys, rates, message):
    with pytest.raises(SystemExit) as exit_info:
        merge_models.main(["--models", "a", "b", "--method", "task_arithmetic", "--drop_rate", *rates,
                           "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_path_existing_output_and_unknown_method(llama_family, tmp_path, capsys):
    code, err = _run(["--base_model", str(llama_family["base"]), "--models", str(tmp_path / "nope"),
                      "--method", "linear", "--output_dir", str(tmp_path / "o1")], capsys)
    assert code == 2 and "nope: no such checkpoint folder" in err and not (tmp_path / "o1").exists()
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    code, err = _run(["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]),
                      "--method", "linear", "--output_dir", str(existing)], capsys)
    assert code == 2 and "already exists; pass --overwrite" in err and (existing / "keep.txt").exists()
    code, _ = _run(["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]),
                    "--method", "linear", "--output_dir", str(existing), "--overwrite"])
    assert code == 0 and not (existing / "keep.txt").exists() and (existing / "model.safetensors").exists()
    with pytest.raises(SystemExit) as exit_info:
        merge_models.main(["--models", "x", "--method", "frankenmerge", "--output_dir", "o"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'frankenmerge'" in capsys.readouterr().err


def test_pickle_checkpoints_are_refused_unless_allowed(llama_family, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(_weights(llama_family["ft0"]), pickled / "pytorch_model.bin")
    shutil.copy(llama_family["ft0"] / "config.json", pickled)
    args = ["--base_model", str(llama_family["base"]), "--models", str(pickled), "--method", "linear"]
    code, err = _run(args + ["--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "only pickled .bin weights" in err
    code, _ = _run(args + ["--allow_pickle", "--output_dir", str(tmp_path / "o")])
    assert code == 0


def test_header_length_beyond_file_is_reported(tmp_path):
    from utils.engine.reader import CheckpointError, SafetensorsFile

    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match="bad.safetensors: truncated"):
        SafetensorsFile(path)


@pytest.mark.parametrize("method, extra", [
    ("task_arithmetic", []), ("task_arithmetic", ["--weights", "0.5", "0.5"]), ("average_merging", []),
    ("ties_merging", ["--density", "0.4"]), ("ties_merging", ["--ties_normalize", "weights"]),
    ("ties_merging", ["--weight_format", "finetuned_weight"]),
])
def test_streaming_in_pieces_is_bit_identical(llama_family, tmp_path, monkeypatch, method, extra):
    import utils.engine.streaming as engine

    args = ["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]),
            str(llama_family["ft1"]), "--method", method, "--drop_rate", "0.7", "--seed", "5"] + extra
    assert _run(args + ["--output_dir", str(tmp_path / "whole"), "--threads", "1"])[0] == 0
    monkeypatch.setattr(engine, "PIECE", 100)     # every tensor above 100 elements goes in pieces
    assert _run(args + ["--output_dir", str(tmp_path / "pieces"), "--threads", "3"])[0] == 0
    whole, pieces = _weights(tmp_path / "whole"), _weights(tmp_path / "pieces")
    assert all(torch.equal(whole[n], pieces[n]) for n in whole)
    manifests = [json.loads((tmp_path / f / "merge_manifest.json").read_text()) for f in ("whole", "pieces")]
    fractions = [m["dare"]["per_model"][1]["kept_fraction"] for m in manifests]
    assert fractions[0] == pytest.approx(fractions[1])


def test_hub_id_that_cannot_be_fetched_is_reported(llama_family, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _run(["--base_model", str(llama_family["base"]), "--models", "some-org/not-a-local-model",
                      "--method", "average_merging", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "some-org/not-a-local-model: not a local folder, and fetching it from the Hugging Face hub failed" in err
    assert not (tmp_path / "o").exists()


def test_engine_validates_the_job_once_before_reading_anything(tmp_path):
    from model_merging_methods import DareOptions, MergeError, MergeOptions
    from utils.engine.streaming import StreamMergeJob, resolve_job, run_stream_merge

    job = StreamMergeJob(base_model="b", models=["m0", "m1"], method="ties_merging", output_dir=str(tmp_path / "o"),
                         options=MergeOptions(ties_trim="global"))
    with pytest.raises(MergeError, match="needs the whole model in memory"):
        run_stream_merge(job)
    job = StreamMergeJob(base_model=None, models=["m0", "m1"], method="task_arithmetic",
                         output_dir=str(tmp_path / "o"))
    with pytest.raises(MergeError, match="task_arithmetic needs a base"):
        run_stream_merge(job)
    job = StreamMergeJob(base_model="b", models=["m0", "m1"], method="task_arithmetic", output_dir=str(tmp_path / "o"),
                         dare=DareOptions(drop_rate=[0.8, 0.4], strategy="magnitude"))
    resolved = resolve_job(job)
    assert [d.drop_rate for d in resolved.dare] == pytest.approx([0.8, 0.4])
    assert resolved.dare[0].strategy == "magnitude" and str(resolved.device) == "cpu"
    if not torch.cuda.is_available():
        job.device = "cuda:0"
        with pytest.raises(MergeError, match="CUDA is not available"):
            resolve_job(job)
    assert not (tmp_path / "o").exists()
