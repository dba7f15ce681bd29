"""extract_lora.py: closed-form low-rank factors, adapters PEFT loads and folds back to the fine-tune,
embeddings (tied too), norms and biases, bad inputs, and the comparison with mergekit-extract-lora."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import extract_lora
from conftest import save_tiny_llama
from lora_helpers import load_base, make_adapter, tiny_bert, tiny_gpt2, tiny_llama
from utils.engine.reader import open_checkpoint
from utils.lora.extract import low_rank

MERGEKIT_EXTRACT = Path("/work/venvs/mergekit/bin/mergekit-extract-lora")


def test_low_rank_is_the_truncated_svd():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 5, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(30, 5, dtype=torch.float64))
    sigma = torch.tensor([5.0, 3.0, 2.0, 0.5, 0.1], dtype=torch.float64)
    for delta in ((u * sigma) @ v.T, ((u * sigma) @ v.T).T):   # wide and tall
        a, b, found = low_rank(delta.float(), rank=3, sv_epsilon=None)   # the top 3 eigenpairs only
        assert a.shape[0] == 3 and found.shape == (3,) and torch.allclose(found, sigma[:3], atol=1e-6)
        _, _, above = low_rank(delta.float(), rank=None, sv_epsilon=1e-3)   # those above the threshold
        assert above.shape == (5,) and torch.allclose(above, sigma, atol=1e-6)
        none, _, alone = low_rank(delta.float(), rank=None, sv_epsilon=10.0)   # none kept: σ_max alone (report)
        assert none.shape[0] == 0 and alone.shape == (1,) and abs(float(alone[0]) - 5.0) < 1e-6
        error = (delta - b.double() @ a.double()).norm()
        assert abs(error - (0.5 ** 2 + 0.1 ** 2) ** 0.5) < 1e-5           # Eckart–Young: the dropped σ
        a, _, _ = low_rank(delta.float(), rank=None, sv_epsilon=1.0)
        assert a.shape[0] == 3                                          # σ > 1: three of them
        a, b, _ = low_rank(delta.float(), rank=8, sv_epsilon=None)
        assert torch.allclose(b.double() @ a.double(), delta, atol=1e-5)  # directions with σ ≈ 0: zero factors


def _run(*args):
    return extract_lora.main([str(a) for a in args])


def _folded(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base), str(adapter)).merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    base = save_tiny_llama(root / "base", seed=0)
    return {"root": root, "base": base, "ft": save_tiny_llama(root / "ft", 1, base)}


def test_full_rank_extraction_folds_back_to_the_fine_tune(llama, tmp_path):
    """At full rank every module's B A is ΔW; norms go in full: PEFT's merge_and_unload gives the fine-tune."""
    out = tmp_path / "lora"
    assert _run("--base", llama["base"], "--model", llama["ft"], "--output_dir", out, "--rank", 64,
                "--dtype", "float32") == 0
    report = json.loads((out / "extract_report.json").read_text())
    assert report["total"]["relative_error"] < 1e-6
    assert any("norm" in m for m in report["modules_to_save"])
    kinds = {m["module"]: m["kind"] for m in report["modules"]}
    assert kinds["model.embed_tokens"] == "embedding" and kinds["lm_head"] == "linear"
    folded, model = _folded(llama["base"], out), load_base(llama["ft"]).state_dict()
    for name in model:
        torch.testing.assert_close(folded[name], model[name], rtol=1e-4, atol=1e-5)


def test_rank_and_threshold_set_each_module_rank(llama, tmp_path):
    out = tmp_path / "lora"
    assert _run("--base", llama["base"], "--model", llama["ft"], "--output_dir", out, "--rank", 8, "--sv_epsilon",
                0.045, "--embeddings", "full", "--non_lora", "skip") == 0
    report = json.loads((out / "extract_report.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {m["module"]: m["rank"] for m in report["modules"]}
    assert max(ranks.values()) == config["r"] == 8 and min(ranks.values()) < 8     # the threshold cut some
    assert config["rank_pattern"] == {m: r for m, r in ranks.items() if r != 8} == config["alpha_pattern"]
    assert set(report["modules_to_save"]) == {"model.embed_tokens", "lm_head"}
    assert all(s["why"] == "--non_lora skip" for s in report["skipped"]) and report["skipped"]
    reader, base = open_checkpoint(str(llama["ft"]))[1], open_checkpoint(str(llama["base"]))[1]
    tensors = load_file(out / "adapter_model.safetensors")
    for module in report["modules"]:     # the reported error is that of the stored factors, and ≤ the truth
        name = module["module"]
        delta = reader.get(name + ".weight").double() - base.get(name + ".weight").double()
        b, a = tensors[f"base_model.model.{name}.lora_B.weight"], tensors[f"base_model.model.{name}.lora_A.weight"]
        assert abs((delta - b.double() @ a.double()).norm() - module["error"]) < 1e-9
        sigma = torch.linalg.svdvals(delta)
        assert module["rank"] == min(8, int((sigma > 0.045).sum()))
        assert module["error"] <= sigma[module["rank"]:].square().sum().sqrt() * (1 + 1e-5) + 1e-7


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama_tied"])
def test_other_layouts_fold_back(tmp_path, family):
    """GPT-2 (Conv1D, fan_in_fan_out, tied head), BERT (biases: lora_B.bias; LayerNorms in full) and a tied
    Llama: a fine-tune made by folding a random PEFT adapter (plus trained norms / biases) is recovered."""
    build = {"gpt2": tiny_gpt2, "bert": tiny_bert, "llama_tied": lambda f: tiny_llama(f, tied=True)}[family]
    targets = {"gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"], "llama_tied": ["q_proj", "embed_tokens"]}[family]
    base = build(tmp_path / "base")
    extra = {"bias": "all"} if family == "bert" else {"modules_to_save": ["ln_f" if family == "gpt2" else "norm"]}
    adapter = make_adapter(base, tmp_path / "true", r=2, lora_alpha=4, target_modules=targets, **extra)
    ft = tmp_path / "ft"
    from peft import PeftModel
    PeftModel.from_pretrained(load_base(base), str(adapter)).merge_and_unload().save_pretrained(ft)
    out = tmp_path / "lora"
    assert _run("--base", base, "--model", ft, "--output_dir", out, "--sv_epsilon", 1e-4, "--dtype", "float32") == 0
    report = json.loads((out / "extract_report.json").read_text())
    assert all(m["rank"] in (0, 2) for m in report["modules"]) and report["total"]["relative_error"] < 1e-5
    folded, model = _folded(base, out), load_base(ft).state_dict()
    for name in model:
        torch.testing.assert_close(folded[name], model[name], rtol=1e-4, atol=1e-5)


def test_bad_inputs_exit_2_and_write_nothing(llama, tmp_path, capsys):
    def bad(*args):
        out = tmp_path / "out"
        capsys.readouterr()
        code = _run("--output_dir", out, *args)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and not out.exists(), err
        return err

    common = ("--base", llama["base"], "--model", llama["ft"])
    assert "--rank must be ≥ 1" in bad(*common, "--rank", 0)
    assert "give --rank, --sv_epsilon" in bad(*common)
    assert "not low-rank" in bad(*common, "--rank", 4, "--non_lora", "refuse")
    wide = tiny_llama(tmp_path / "wide", hidden=32)
    assert "in" in bad("--base", llama["base"], "--model", wide, "--rank", 4)
    assert "nothing to extract" in bad("--base", llama["base"], "--model", llama["base"], "--rank", 4)
    assert "already exists" in _exists(tmp_path, common, capsys)


def _exists(tmp_path, common, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    capsys.readouterr()
    assert _run("--output_dir", out, *common, "--rank", 2) == 2 and not any(out.iterdir())
    return capsys.readouterr().err


@pytest.mark.skipif(not MERGEKIT_EXTRACT.exists(), reason="mergekit's venv (/work/venvs/mergekit) is absent")
@pytest.mark.parametrize("embed_lora", [False, True])
def test_same_modules_and_ranks_as_mergekit_extract_lora_and_no_worse_error(llama, tmp_path, embed_lora):
    theirs = tmp_path / "mergekit"
    command = [str(MERGEKIT_EXTRACT), "--model", str(llama["ft"]), "--base-model", str(llama["base"]),
               "--out-path", str(theirs), "--max-rank", "6", "--sv-epsilon", "0.04"]
    subprocess.run(command + (["--embed-lora"] if embed_lora else []), check=True, capture_output=True, timeout=600)
    ours = tmp_path / "ours"
    assert _run("--base", llama["base"], "--model", llama["ft"], "--output_dir", ours, "--rank", 6, "--sv_epsilon",
                0.04, "--embeddings", "lora" if embed_lora else "full") == 0
    their_tensors, our_tensors = load_file(theirs / "adapter_model.safetensors"), load_file(ours / "adapter_model.safetensors")
    their_factors = {k for k in their_tensors if ".lora_" in k}
    assert their_factors == {k for k in our_tensors if ".lora_" in k}
    base, ft = open_checkpoint(str(llama["base"]))[1], open_checkpoint(str(llama["ft"]))[1]
    for key in sorted(k for k in their_factors if k.endswith(("lora_A.weight", "lora_embedding_A"))):
        b_key = key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
        assert their_tensors[key].shape == our_tensors[key].shape, key                   # same rank
        module = key.removeprefix("base_model.model.").rsplit(".", 2 if key.endswith("weight") else 1)[0]
        delta = ft.get(module + ".weight").double() - base.get(module + ".weight").double()
        if "embedding" in key:
            delta = delta.T
        errors = [(delta - t[b_key].double() @ t[key].double()).norm() for t in (their_tensors, our_tensors)]
        assert errors[1] <= errors[0] * (1 + 1e-3), (key, errors)
    full = lambda tensors: {k for k in tensors if ".lora_" not in k}
    assert full(our_tensors) <= full(their_tensors)   # mergekit also saves unchanged norms in full
