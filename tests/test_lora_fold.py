"""Adapters as merge inputs: `base+adapter` read with the LoRA folded in per tensor equals PEFT's
merge_and_unload(); flags and recipes take such references; bad adapters are refused in one line."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merge_models
from lora_helpers import make_adapter, merged_state, tiny_bert, tiny_gpt2, tiny_llama
from utils.engine.reader import open_checkpoint
from utils.lora.adapter import AdapterError

CASES = {
    "llama": (tiny_llama, {}, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj",
                                                                          "embed_tokens", "lm_head"])),
    "llama_tied_head_norms": (tiny_llama, {"tied": True}, dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                                modules_to_save=["norm"])),
    "llama_rslora_patterns": (tiny_llama, {}, dict(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"v_proj": 2},
                                                   alpha_pattern={"q_proj": 3}, target_modules=["q_proj", "v_proj", "o_proj"])),
    # two modules on one float32 tensor, folded from the base's own rows (no saved embedding copy)
    "llama_tied_embedding_and_head": (tiny_llama, {"tied": True}, dict(r=4, lora_alpha=8, save_embedding_layers=False,
                                                                       target_modules=["embed_tokens", "lm_head", "q_proj"])),
    "llama_bf16": (tiny_llama, {"dtype": torch.bfloat16}, dict(r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"])),
    "gpt2_fan_in_fan_out": (tiny_gpt2, {}, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                fan_in_fan_out=True, modules_to_save=["ln_f"])),
    "bert_bias_all": (tiny_bert, {}, dict(r=3, lora_alpha=5, target_modules=["query", "value", "dense"], bias="all")),
    "bert_lora_bias": (tiny_bert, {}, dict(r=3, lora_alpha=5, target_modules=["query", "value"], lora_bias=True)),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_fold")
    made = {}
    for name, (build, kwargs, config) in CASES.items():
        base = build(root / f"{name}_base", **kwargs)
        made[name] = (base, make_adapter(base, root / f"{name}_adapter", **config))
    return made


@pytest.mark.parametrize("case", list(CASES))
def test_folded_reader_equals_peft_merge_and_unload(pairs, case):
    base, adapter = pairs[case]
    expected = merged_state(base, adapter)
    folder, reader = open_checkpoint(f"{base}+{adapter}")
    assert folder == base and reader.deltas   # something is adapted
    changed = 0
    for name in reader.names():
        whole = reader.get(name)
        assert torch.equal(whole, expected[name]), name     # bit for bit, dtype included
        changed += not torch.equal(whole, open_checkpoint(str(base))[1].get(name))
        numel = whole.numel()        # flat pieces (what the engine reads of large tensors): rows of B·A
        pieces = torch.cat([reader.get(name, s, min(s + 37, numel)) for s in range(0, numel, 37)])
        torch.testing.assert_close(pieces, whole.reshape(-1), rtol=1e-6, atol=1e-6)
    assert changed >= len(reader.deltas)


def test_merge_models_flag_and_recipe_fold_adapters(pairs, tmp_path):
    """--models base+adapter and a recipe's `model: base+adapter` give the same tensors as merging the
    merge_and_unload() checkpoint."""
    base, adapter = pairs["llama"]
    full = tmp_path / "full"
    full.mkdir()
    for file in base.iterdir():
        shutil.copy(file, full)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in merged_state(base, adapter).items()}, full / "model.safetensors",
              metadata={"format": "pt"})
    runs = {}
    for label, model in (("adapter", f"{base}+{adapter}"), ("full", str(full))):
        out = tmp_path / f"flags_{label}"
        assert merge_models.main(["--base_model", str(base), "--models", model, model, "--method", "task_arithmetic",
                                  "--weights", "0.5", "0.25", "--output_dir", str(out), "--no_progress"]) == 0
        runs[f"flags_{label}"] = load_file(out / "model.safetensors")
        recipe = tmp_path / f"{label}.yml"
        recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                          f"  - model: {model}\n    parameters: {{weight: 0.75}}\ndtype: float32\n")
        out = tmp_path / f"recipe_{label}"
        assert merge_models.main(["--config", str(recipe), "--output_dir", str(out), "--no_progress"]) == 0
        runs[f"recipe_{label}"] = load_file(out / "model.safetensors")
    manifest = json.loads((tmp_path / "flags_adapter" / "merge_manifest.json").read_text())
    assert any(f["file"] == "adapter_model.safetensors" for f in manifest["inputs"][1]["files"])
    for kind in ("flags", "recipe"):
        ours, reference = runs[f"{kind}_adapter"], runs[f"{kind}_full"]
        assert ours.keys() == reference.keys()
        for name in ours:
            assert torch.equal(ours[name], reference[name]), (kind, name)
    assert not torch.equal(runs["flags_adapter"]["model.layers.0.self_attn.q_proj.weight"],
                           load_file(base / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"])


def _bad(tmp_path, base, adapter, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    code = merge_models.main(["--base_model", str(base), "--models", f"{base}+{adapter}", "--method",
                              "task_arithmetic", "--output_dir", str(out), "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not out.exists(), err
    return err


def test_bad_adapters_exit_2_with_one_line(pairs, tmp_path, capsys):
    base, adapter = pairs["llama"]
    assert "was trained on" in _bad(tmp_path, tiny_llama(tmp_path / "wide", hidden=32), adapter, capsys)
    unnamed = tmp_path / "unnamed"    # no recorded base: the shapes and names must tell
    shutil.copytree(adapter, unnamed)
    config = json.loads((unnamed / "adapter_config.json").read_text())
    (unnamed / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    assert "another base model" in _bad(tmp_path, tmp_path / "wide", unnamed, capsys)   # same names, other shapes
    gpt2_base, _ = pairs["gpt2_fan_in_fan_out"]
    assert "absent from the base" in _bad(tmp_path, gpt2_base, unnamed, capsys)
    broken = tmp_path / "no_config"
    shutil.copytree(adapter, broken)
    (broken / "adapter_config.json").unlink()
    assert "no adapter_config.json" in _bad(tmp_path, base, broken, capsys)
    for key, value, words in (("use_dora", True, "DoRA"), ("peft_type", "IA3", "peft_type 'IA3'"),
                              ("lora_alpha", "eight", 'lora_alpha is "eight", expected a finite number'),
                              ("alpha_pattern", {"q_proj": "x"}, "alpha_pattern is"),
                              ("base_model_name_or_path", "org/some-other-model", "was trained on 'org/some-other-model'")):
        edited = tmp_path / f"edited_{key}"
        shutil.copytree(adapter, edited)
        config = json.loads((edited / "adapter_config.json").read_text())
        config[key] = value
        (edited / "adapter_config.json").write_text(json.dumps(config))
        assert words in _bad(tmp_path, base, edited, capsys)
    assert "no such adapter folder" in _bad(tmp_path, base, tmp_path / "missing", capsys)


def test_dora_adapter_made_by_peft_is_refused(pairs, tmp_path):
    base, _ = pairs["llama"]
    dora = make_adapter(base, tmp_path / "dora", r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        open_checkpoint(f"{base}+{dora}")


def test_fold_reads_the_config_as_peft_does_without_importing_it(pairs):
    """The fields folding reads default as peft.LoraConfig's do, alpha_pattern keys match as PEFT's
    get_pattern_key matches them, and folding never imports peft (it costs seconds)."""
    import subprocess
    import sys

    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    from utils.lora.adapter import FOLD_DEFAULTS, pattern_key

    fields = LoraConfig.__dataclass_fields__
    for name, default in FOLD_DEFAULTS.items():
        field = fields[name]
        assert (field.default_factory() if callable(field.default_factory) else field.default) == default, name
    patterns = {"q_proj": 1, "layers.1.self_attn.v_proj": 2, r"model\.layers\.[02]\..*o_proj": 3, "proj": 4, "v_proj": 5}
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.2.self_attn.v_proj",
               "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj", "model.layers.0.mlp.up_proj",
               "model.layers.0.mlp.gate", "xq_proj", "q_proj"]
    for module in modules:
        assert pattern_key(patterns, module) == get_pattern_key(list(patterns), module), module
    base, adapter = pairs["llama_rslora_patterns"]
    code = (f"import sys; from utils.engine.reader import open_checkpoint; r = open_checkpoint({str(base) + '+' + str(adapter)!r})[1]; "
            "[r.get(n) for n in r.names()]; print(sorted(m for m in sys.modules if m.split('.')[0] in ('peft', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("rank,scaling,transpose", [(32, 1.0, False), (32, 2.0, True), (8, 0.7, False),
                                                    (256, 1.0, False)])
def test_fused_fold_rows_have_the_bits_of_product_scale_add(rank, scaling, transpose):
    """add_delta_rows (one GEMM with C = float(W) where this BLAS gives the same bits) equals PEFT's order,
    ((B @ A) · s) + float(W), bit for bit: on the first piece of a layout (both computed) and on later ones
    (the cached choice), whichever path the check chose (rank 256 splits the rank into blocks on MKL; a
    scaling of 0.7 makes the kernel's α·acc + C one rounding: those keep the three steps)."""
    from utils.lora.adapter import _FUSED, add_delta_rows, delta_weight

    generator = torch.Generator().manual_seed(rank)
    rows, columns, total = 96, 320, 400
    a = torch.randn(rank, total if transpose else columns, generator=generator) * 0.05
    b = torch.randn(columns if transpose else total, rank, generator=generator) * 0.05
    full = delta_weight(a, b, scaling, transpose)
    for first in (0, rows, 2 * rows):     # three pieces of one layout (the transposed left operand's
        weight = torch.randn(rows, columns, generator=generator).bfloat16()   # alignment moves with `first`)
        expected = full[first:first + rows].contiguous().add_(weight.float())
        got = add_delta_rows(weight.float(), a, b, scaling, transpose, first, first + rows,
                             scratch=torch.empty(rows, columns))
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert _FUSED, "the first piece records its layout's choice"
