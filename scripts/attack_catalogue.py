"""Rerun a catalogue of hostile and careless inputs against every entry script and the code sandbox, and
check the promise of docs/reliability.md for each: bad input → exit status 2 and one short line (no
traceback), inputs unchanged, nothing half-written or left over, nothing non-finite published, no escape.

    python scripts/attack_catalogue.py [--only SUBSTRING] [--keep]

Each case runs the script's main(argv) in this process (a traceback = an exception escaping main) on
tiny random models built in a temporary folder, then checks the exit status, stderr and the folder.
Prints one line per case (ok / WRONG and why) and "tried N, right M"; exit status 1 if any is wrong.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass
class Case:
    name: str
    script: str                       # a root script name, or scripts/<name>.py
    argv: Callable[[Path], list[str]]
    expect: int | tuple = 2
    says: str = ""                    # a substring the stderr line must contain
    setup: Callable[[Path], None] = lambda work: None
    check: Callable[[Path], str | None] = lambda work: None   # extra check: None or what is wrong
    one_line: bool = True
    tags: tuple = field(default_factory=tuple)


def _module(script: str):
    path = REPO / script
    spec = importlib.util.spec_from_file_location(f"attack_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(case: Case, work: Path) -> tuple[int | None, str, str]:
    err, out = io.StringIO(), io.StringIO()
    escaped = ""
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = _module(case.script).main(case.argv(work))
            code = 0 if code is None or isinstance(code, list) else code
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
        except BaseException:
            code, escaped = None, traceback.format_exc()
    return code, err.getvalue(), escaped


# --------------------------------------------------------------------------------------------- fixtures

def tiny_llama(folder: Path, seed: int, base: Path | None = None) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if base is not None:
        reference = LlamaForCausalLM.from_pretrained(base).state_dict()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(reference[name] + 0.01 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def lora_adapter(base: Path, folder: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(folder)
    return folder


def build_models(root: Path) -> None:
    base = tiny_llama(root / "models" / "base", 0)
    tiny_llama(root / "models" / "ft0", 1, base)
    tiny_llama(root / "models" / "ft1", 2, base)
    lora_adapter(base, root / "models" / "lora0", 3)
    lora_adapter(base, root / "models" / "lora1", 4)


# ------------------------------------------------------------------------------------------------ cases

def M(work: Path, name: str) -> str:
    return str(work / "models" / name)


def merge(*extra: str, method: str = "task_arithmetic"):
    return lambda w: ["--base_model", M(w, "base"), "--models", M(w, "ft0"), M(w, "ft1"), "--method", method,
                      "--no_progress", *[e.format(w=w) for e in extra]]


def recipe(text: str, *extra: str):
    def argv(work: Path) -> list[str]:
        (work / "r.yml").write_text(text.replace("models/", f"{work}/models/"))
        return ["--config", str(work / "r.yml"), "--no_progress", *[e.format(w=work) for e in extra]]
    return argv


def analyze(*extra: str):
    return lambda w: ["--base_model", M(w, "base"), "--models", M(w, "ft0"), M(w, "ft1"), "--no_progress",
                      "--no_figures", *[e.format(w=w) for e in extra]]


def file_at(relative: str):
    def setup(work: Path) -> None:
        (work / relative).write_text("the user's notes")
    return setup


def file_kept(relative: str):
    return lambda work: None if (work / relative).read_text() == "the user's notes" else f"{relative} changed"


def no_output(relative: str = "out"):
    return lambda work: f"{relative} was written" if (work / relative).exists() else None


LINEAR = "merge_method: linear\nmodels:\n  - model: models/ft0\n    parameters: {{weight: {a}}}\n" \
         "  - model: models/ft1\n    parameters: {{weight: {b}}}\ndtype: float32\n"
GTA = "merge_method: {m}\nbase_model: models/base\nmodels:\n  - model: models/ft0\n    parameters: " \
      "{{weight: 1.0, density: {d}}}\n  - model: models/ft1\n    parameters: {{weight: 1.0, density: 0.5}}\n" \
      "dtype: float32\n"
SLERP = "merge_method: slerp\nbase_model: models/base\nmodels:\n  - model: models/base\n  - model: models/ft0\n" \
        "parameters: {{t: {t}}}\ndtype: float32\n"
TWO_STAGE = ("name: first\nmerge_method: linear\nmodels:\n  - model: models/ft0\n  - model: models/ft1\n"
             "parameters: {weight: 0.5}\ndtype: float32\n---\nname: final\nmerge_method: task_arithmetic\n"
             "base_model: models/base\nmodels:\n  - model: first\n    parameters: {weight: 1.0}\ndtype: float32\n")
LAUGHS = ("merge_method: linear\nmodels:\n  - model: models/ft0\n    parameters:\n      weight: [{filter: mlp, value: ["
          + ", ".join(["&a [" + ", ".join(["lol"] * 10) + "]"]
                      + [f"&{c} [" + ", ".join([f"*{chr(ord(c) - 1)}"] * 10) + "]" for c in "bcdef"]) + "]}]\n")
MOE = "base_model: models/base\ngate_mode: random\nexperts:\n  - source_model: models/ft0\n    {key}: {value}\n" \
      "  - source_model: models/ft1\n"


def moe(text: str, *extra: str):
    def argv(work: Path) -> list[str]:
        (work / "moe.yml").write_text(text.replace("models/", f"{work}/models/"))
        return [str(work / "moe.yml"), "--no_progress", *[e.format(w=work) for e in extra]]
    return argv


def sweep_file(work: Path, spec: dict) -> str:
    import yaml

    (work / "s.yml").write_text(yaml.safe_dump(spec))
    return str(work / "s.yml")


def toy_sweep(**changes):
    def argv(work: Path) -> list[str]:
        spec = {"name": "toy", "script": "merge_models.py", "output_root": str(work / "sweep"),
                "output_flag": "output_dir",
                "fixed": {"base_model": M(work, "base"), "models": [M(work, "ft0")], "method": "task_arithmetic",
                          "no_progress": True}, "axes": {"scaling_coefficient": [0.5]}}
        spec.update(changes.pop("spec", {}))
        return ["run", sweep_file(work, spec), *changes.get("flags", [])]
    return argv


def sweep_status_with(content: str):
    def argv(work: Path) -> list[str]:
        path = toy_sweep()(work)[1]
        _run(Case("first", "scripts/sweep.py", lambda w: ["run", path]), work)
        records = list((work / "sweep").glob("*/sweep_record.json"))
        records[0].write_text(content)
        return ["status", path]
    return argv


def hold_sweep_lock(work: Path) -> None:
    from utils.sweeps.runner import held_lock

    (work / "sweep").mkdir(parents=True, exist_ok=True)
    HELD.append(held_lock(work / "sweep" / ".sweep-toy.lock"))


HELD: list = []


def cases() -> list[Case]:
    found = [
        # merge_models.py, flags
        Case("merge: output is an input (--overwrite)", "merge_models.py", merge("--output_dir", "{w}/models/ft0", "--overwrite"), says="overlaps"),
        Case("merge: output inside an input", "merge_models.py", merge("--output_dir", "{w}/models/ft0/out"), says="overlaps"),
        Case("merge: output contains the inputs (--overwrite)", "merge_models.py", merge("--output_dir", "{w}/models", "--overwrite"), says="overlaps"),
        Case("merge: a file at --output_dir (--overwrite)", "merge_models.py", merge("--output_dir", "{w}/notes", "--overwrite"), says="is a file", setup=file_at("notes"), check=file_kept("notes")),
        Case("merge: existing folder without --overwrite", "merge_models.py", merge("--output_dir", "{w}/existing"), says="already exists", setup=lambda w: (w / "existing").mkdir()),
        Case("merge: --max_shard_size_gb -1", "merge_models.py", merge("--output_dir", "{w}/out", "--max_shard_size_gb", "-1"), says="max_shard_size_gb", check=no_output()),
        Case("merge: --max_shard_size_gb inf", "merge_models.py", merge("--output_dir", "{w}/out", "--max_shard_size_gb", "inf"), says="max_shard_size_gb", check=no_output()),
        Case("merge: --max_shard_size_gb nan", "merge_models.py", merge("--output_dir", "{w}/out", "--max_shard_size_gb", "nan"), says="max_shard_size_gb", check=no_output()),
        Case("merge: --drop_rate 1", "merge_models.py", merge("--output_dir", "{w}/out", "--drop_rate", "1"), says="drop", check=no_output()),
        Case("merge: --drop_rate nan", "merge_models.py", merge("--output_dir", "{w}/out", "--drop_rate", "nan"), says="drop", check=no_output()),
        Case("merge: --scaling_coefficient nan", "merge_models.py", merge("--output_dir", "{w}/out", "--scaling_coefficient", "nan"), check=no_output()),
        Case("merge: --scaling_coefficient inf", "merge_models.py", merge("--output_dir", "{w}/out", "--scaling_coefficient", "inf"), check=no_output()),
        Case("merge: --weights summing to 0", "merge_models.py", merge("--output_dir", "{w}/out", "--weights", "1", "-1", method="average_merging"), check=no_output()),
        Case("merge: --threads 0", "merge_models.py", merge("--output_dir", "{w}/out", "--threads", "0"), says="threads", check=no_output()),
        Case("merge: bad --exclude_param_names_regex", "merge_models.py", merge("--output_dir", "{w}/out", "--exclude_param_names_regex", "(["), says="regex", check=no_output()),
        Case("merge: a base model that does not exist", "merge_models.py", lambda w: ["--base_model", str(w / "nope"), "--models", M(w, "ft0"), "--method", "task_arithmetic", "--output_dir", str(w / "out")], check=no_output()),
        Case("merge: --slerp_t nan", "merge_models.py", merge("--output_dir", "{w}/out", "--slerp_t", "nan", method="slerp"), check=no_output()),
        Case("merge: a manifest whose rerun.models is a string", "merge_models.py", lambda w: ["--from_manifest", str(w / "m.json"), "--output_dir", str(w / "out")],
             says="rerun.models", setup=lambda w: (w / "m.json").write_text(json.dumps({"rerun": {"models": M(w, "ft0"), "options": {}}, "inputs": []})), check=no_output()),
        Case("merge: a manifest that is not JSON", "merge_models.py", lambda w: ["--from_manifest", str(w / "m.json"), "--output_dir", str(w / "out")],
             says="not valid JSON", setup=lambda w: (w / "m.json").write_text("{"), check=no_output()),
        # recipes
        Case("recipe: weight .nan", "merge_models.py", recipe(LINEAR.format(a=".nan", b=1), "--output_dir", "{w}/out"), says="finite", check=no_output()),
        Case("recipe: weight .inf", "merge_models.py", recipe(LINEAR.format(a=".inf", b=1), "--output_dir", "{w}/out"), says="finite", check=no_output()),
        Case("recipe: weight 'inf' (a string)", "merge_models.py", recipe(LINEAR.format(a="'inf'", b=1), "--output_dir", "{w}/out"), says="finite", check=no_output()),
        Case("recipe: NaN inside a gradient", "merge_models.py", recipe(LINEAR.format(a="[1, .nan]", b=1), "--output_dir", "{w}/out"), says="finite", check=no_output()),
        Case("recipe: linear weights summing to 0", "merge_models.py", recipe(LINEAR.format(a=1, b=-1), "--output_dir", "{w}/out"), says="sum to 0", check=no_output()),
        Case("recipe: gradient weights summing to 0 (writer's last line)", "merge_models.py", recipe(LINEAR.format(a="[1, 1]", b="[-1, -1]"), "--output_dir", "{w}/out"), says="NaN or Inf", check=no_output()),
        Case("recipe: density .nan", "merge_models.py", recipe(GTA.format(m="ties", d=".nan"), "--output_dir", "{w}/out"), says="finite", check=no_output()),
        Case("recipe: density 0 with DARE rescale", "merge_models.py", recipe(GTA.format(m="dare_ties", d=0), "--output_dir", "{w}/out"), says="density", check=no_output()),
        Case("recipe: density 1.5", "merge_models.py", recipe(GTA.format(m="dare_linear", d=1.5), "--output_dir", "{w}/out"), says="density", check=no_output()),
        Case("recipe: slerp t 2", "merge_models.py", recipe(SLERP.format(t=2), "--output_dir", "{w}/out"), says="[0, 1]", check=no_output()),
        Case("recipe: slerp t .inf", "merge_models.py", recipe(SLERP.format(t=".inf"), "--output_dir", "{w}/out"), says="finite", check=no_output()),
        Case("recipe: python YAML tag", "merge_models.py", recipe("!!python/object/apply:os.system ['touch {w}/pwned']\n", "--output_dir", "{w}/out"), check=lambda w: "pwned" if (w / "pwned").exists() else None),
        Case("recipe: billion laughs", "merge_models.py", recipe(LAUGHS, "--output_dir", "{w}/out"), check=no_output()),
        Case("recipe: unknown key", "merge_models.py", recipe("merge_method: linear\nmodels: [{model: models/ft0}]\nweigth: 1\n", "--output_dir", "{w}/out"), says="unknown key", check=no_output()),
        Case("recipe: a list, not a mapping", "merge_models.py", recipe("- 1\n- 2\n", "--output_dir", "{w}/out"), says="mapping", check=no_output()),
        Case("recipe: empty file", "merge_models.py", recipe("", "--output_dir", "{w}/out"), says="empty", check=no_output()),
        Case("recipe: output is an input (--overwrite)", "merge_models.py", recipe(LINEAR.format(a=1, b=1), "--output_dir", "{w}/models/ft0", "--overwrite"), says="overlaps"),
        Case("recipe: --intermediate_dir equal to --output_dir", "merge_models.py", recipe(TWO_STAGE, "--output_dir", "{w}/out", "--intermediate_dir", "{w}/out"), says="--intermediate_dir", check=no_output()),
        Case("recipe: --intermediate_dir inside --output_dir", "merge_models.py", recipe(TWO_STAGE, "--output_dir", "{w}/out", "--intermediate_dir", "{w}/out/i"), says="--intermediate_dir", check=no_output()),
        Case("recipe: --intermediate_dir containing --output_dir", "merge_models.py", recipe(TWO_STAGE, "--output_dir", "{w}/i/out", "--intermediate_dir", "{w}/i"), says="--intermediate_dir", check=no_output("i")),
        Case("recipe: a file at --output_dir (--overwrite)", "merge_models.py", recipe(LINEAR.format(a=1, b=1), "--output_dir", "{w}/notes", "--overwrite"), says="is a file", setup=file_at("notes"), check=file_kept("notes")),
        # merge_moe.py
        Case("moe: residual_scale .inf", "merge_moe.py", moe(MOE.format(key="residual_scale", value=".inf"), "--output_dir", "{w}/out"), says="residual_scale", check=no_output()),
        Case("moe: residual_scale .nan", "merge_moe.py", moe(MOE.format(key="residual_scale", value=".nan"), "--output_dir", "{w}/out"), says="residual_scale", check=no_output()),
        Case("moe: noise_scale .inf", "merge_moe.py", moe(MOE.format(key="noise_scale", value=".inf"), "--output_dir", "{w}/out"), says="noise_scale", check=no_output()),
        Case("moe: --max_shard_size_gb -1", "merge_moe.py", moe(MOE.format(key="noise_scale", value=0), "--output_dir", "{w}/out", "--max_shard_size_gb", "-1"), says="max_shard_size_gb", check=no_output()),
        Case("moe: output is the base (--overwrite)", "merge_moe.py", moe(MOE.format(key="noise_scale", value=0), "--output_dir", "{w}/models/base", "--overwrite"), says="overlaps"),
        Case("moe: a file at --output_dir (--overwrite)", "merge_moe.py", moe(MOE.format(key="noise_scale", value=0), "--output_dir", "{w}/notes", "--overwrite"), says="is a file", setup=file_at("notes"), check=file_kept("notes")),
        Case("moe: config is a list", "merge_moe.py", moe("- 1\n", "--output_dir", "{w}/out"), says="mapping", check=no_output()),
        Case("moe: config file missing", "merge_moe.py", lambda w: [str(w / "missing.yml"), "--output_dir", str(w / "out")], says="missing.yml", check=no_output()),
        # analyze_task_vectors.py
        Case("analyze: output is an input (--overwrite)", "analyze_task_vectors.py", analyze("--output_dir", "{w}/models/ft0", "--overwrite"), says="overlaps"),
        Case("analyze: output contains the inputs (--overwrite)", "analyze_task_vectors.py", analyze("--output_dir", "{w}/models", "--overwrite"), says="overlaps"),
        Case("analyze: output inside an input", "analyze_task_vectors.py", analyze("--output_dir", "{w}/models/ft0/analysis"), says="overlaps"),
        Case("analyze: a file at --output_dir (--overwrite)", "analyze_task_vectors.py", analyze("--output_dir", "{w}/notes", "--overwrite"), says="is a file", setup=file_at("notes"), check=file_kept("notes")),
        Case("analyze: a model that does not exist", "analyze_task_vectors.py", lambda w: ["--base_model", M(w, "base"), "--models", str(w / "nope"), "--output_dir", str(w / "out")], check=no_output()),
        Case("analyze: quantile 2", "analyze_task_vectors.py", analyze("--output_dir", "{w}/out", "--quantiles", "2"), check=no_output()),
        Case("analyze: --top_k -1", "analyze_task_vectors.py", analyze("--output_dir", "{w}/out", "--top_k", "-1"), check=no_output()),
        # merge_lora.py
        Case("lora: output is an adapter (--overwrite)", "merge_lora.py", lambda w: ["--adapters", M(w, "lora0"), M(w, "lora1"), "--output_dir", M(w, "lora0"), "--overwrite"], says="overlaps"),
        Case("lora: output contains the adapters (--overwrite)", "merge_lora.py", lambda w: ["--adapters", M(w, "lora0"), M(w, "lora1"), "--output_dir", str(w / "models"), "--overwrite"], says="overlaps"),
        Case("lora: a file at --output_dir (--overwrite)", "merge_lora.py", lambda w: ["--adapters", M(w, "lora0"), M(w, "lora1"), "--output_dir", str(w / "notes"), "--overwrite"], says="is a file", setup=file_at("notes"), check=file_kept("notes")),
        Case("lora: weights of another count", "merge_lora.py", lambda w: ["--adapters", M(w, "lora0"), M(w, "lora1"), "--weights", "1", "--output_dir", str(w / "out")], check=no_output()),
        Case("lora: weight nan", "merge_lora.py", lambda w: ["--adapters", M(w, "lora0"), M(w, "lora1"), "--weights", "nan", "1", "--output_dir", str(w / "out")], check=no_output()),
        Case("lora: density 2", "merge_lora.py", lambda w: ["--adapters", M(w, "lora0"), M(w, "lora1"), "--combination", "ties", "--density", "2", "--output_dir", str(w / "out")], check=no_output()),
        Case("lora: an adapter that does not exist", "merge_lora.py", lambda w: ["--adapters", str(w / "nope"), "--output_dir", str(w / "out")], check=no_output()),
        # extract_lora.py
        Case("extract: output is the model (--overwrite)", "extract_lora.py", lambda w: ["--base", M(w, "base"), "--model", M(w, "ft0"), "--output_dir", M(w, "ft0"), "--rank", "2", "--overwrite"], says="overlaps"),
        Case("extract: output contains the inputs (--overwrite)", "extract_lora.py", lambda w: ["--base", M(w, "base"), "--model", M(w, "ft0"), "--output_dir", str(w / "models"), "--rank", "2", "--overwrite"], says="overlaps"),
        Case("extract: a file at --output_dir (--overwrite)", "extract_lora.py", lambda w: ["--base", M(w, "base"), "--model", M(w, "ft0"), "--output_dir", str(w / "notes"), "--rank", "2", "--overwrite"], says="is a file", setup=file_at("notes"), check=file_kept("notes")),
        # search_merge.py, evaluate_lm_eval.py
        Case("search: a template that does not exist", "search_merge.py", lambda w: ["--template", str(w / "nope.yml"), "--output_dir", str(w / "search"), "--fitness", "MRPC=1"]),
        Case("search: --output_dir is a file", "search_merge.py", lambda w: ["--template", str(w / "t.yml"), "--output_dir", str(w / "notes"), "--fitness", "MRPC=1"], setup=lambda w: (file_at("notes")(w), (w / "t.yml").write_text("merge_method: linear\nmodels: [{model: a}]\n")), check=file_kept("notes")),
        Case("lm_eval: a model that does not exist", "evaluate_lm_eval.py", lambda w: ["--model", str(w / "nope"), "--tasks", "gsm8k", "--save_dir", str(w / "lm")]),
        # GLUE scripts
        Case("glue train: unknown task", "train_plms_glue.py", lambda w: ["--dataset_name", "nope", "--save_dir", str(w / "glue")], check=no_output("glue")),
        Case("glue train: a config that is not YAML", "train_plms_glue.py", lambda w: ["--config", str(w / "bad.yml"), "--dataset_name", "mrpc"], setup=lambda w: (w / "bad.yml").write_text("a: [1,\n")),
        Case("glue inference: unknown task", "inference_plms_glue.py", lambda w: ["--dataset_name", "nope", "--save_dir", str(w / "glue")], check=no_output("glue")),
        Case("glue inference: drop rate 1", "inference_plms_glue.py", lambda w: ["--dataset_name", "mrpc", "--weight_mask_rate", "1", "--save_dir", str(w / "glue")], check=no_output("glue")),
        Case("glue merge: one task only", "merge_plms_glue.py", lambda w: ["--dataset_names", "mrpc", "--save_dir", str(w / "glue")], check=no_output("glue")),
        # LLM scripts
        Case("llm inference: unknown dataset", "inference_llms_instruct_math_code.py", lambda w: ["--finetuned_model_name", M(w, "ft0"), "--dataset_name", "nope", "--save_dir", str(w / "llm")]),
        Case("llm inference: negative --start_index", "inference_llms_instruct_math_code.py", lambda w: ["--finetuned_model_name", M(w, "ft0"), "--dataset_name", "gsm8k", "--start_index", "-1", "--save_dir", str(w / "llm")]),
        Case("llm merge: drop rate 1", "merge_llms_instruct_math_code.py", lambda w: ["--merge_instruct", "--merge_math", "--merging_method_name", "average_merging", "--weight_mask_rate", "1", "--save_dir", str(w / "llm")]),
        # sweeps
        Case("sweep: --launcher slurm without SLURM", "scripts/sweep.py", toy_sweep(flags=["--launcher", "slurm"]), says="SLURM is not available", check=no_output("sweep/.submitit")),
        Case("sweep: a record that is JSON but not an object", "scripts/sweep.py", sweep_status_with("[1, 2]"), expect=0, one_line=False),
        Case("sweep: a second run while one runs", "scripts/sweep.py", toy_sweep(), says="already running", setup=hold_sweep_lock),
        Case("sweep: output_flag output_dir with merge_models.py", "scripts/sweep.py", toy_sweep(), expect=0, one_line=False,
             check=lambda w: None if list((w / "sweep").glob("*/output/model.safetensors")) else "no merged model"),
        Case("sweep: an unknown flag", "scripts/sweep.py", toy_sweep(spec={"axes": {"no_such_flag": [1]}}), says="no_such_flag", check=no_output("sweep")),
        Case("sweep: python YAML tag", "scripts/sweep.py", lambda w: ["run", str(w / "s.yml")], setup=lambda w: (w / "s.yml").write_text("!!python/object/apply:os.getcwd []\n")),
        Case("sweep: a list, not a mapping", "scripts/sweep.py", lambda w: ["run", str(w / "s.yml")], setup=lambda w: (w / "s.yml").write_text("- 1\n")),
        # aggregation
        Case("aggregate: --out is a file", "scripts/aggregate_results.py", lambda w: [str(w / "results"), "--out", str(w / "notes")], setup=lambda w: (file_at("notes")(w), _result(w)), check=file_kept("notes")),
        Case("aggregate: no result files", "scripts/aggregate_results.py", lambda w: [str(w / "empty"), "--out", str(w / "summary")], setup=lambda w: (w / "empty").mkdir()),
        Case("aggregate: a result JSON that is not an object", "scripts/aggregate_results.py", lambda w: [str(w / "results"), "--out", str(w / "summary")], setup=lambda w: (w / "results").mkdir() or (w / "results" / "x.json").write_text("[1]")),
    ]
    return found


def _result(work: Path) -> None:
    (work / "results").mkdir(exist_ok=True)
    (work / "results" / "r.json").write_text(json.dumps({"script": "inference_plms_glue.py"}))


# ---------------------------------------------------------------------------------------------- sandbox

def sandbox_cases(outside: Path) -> list[tuple[str, Callable[[Path], str | None]]]:
    """(name, attack(work) → None if the sandbox held, else what escaped). `outside`: a folder outside the
    sandbox's where the escapes try to create files ({o} in a program)."""
    import subprocess
    import time
    import uuid

    from utils.llm.sandbox import SandboxLimits, run_program
    from utils.llm.scoring import human_eval_program

    limits = SandboxLimits(timeout=3.0, memory_mb=512)

    def holds(program: str, effect: Callable[[], str | None] = lambda: None, must_fail: bool = True):
        def attack(work: Path) -> str | None:
            result = run_program(program.replace("{w}", str(work)).replace("{o}", str(outside)), limits)
            if must_fail and result.passed:
                return "the program passed"
            return effect()
        return attack

    def victim_survives(program: str):
        def attack(work: Path) -> str | None:
            victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            try:
                run_program(program.replace("{pid}", str(victim.pid)), limits)
                time.sleep(0.2)
                return None if victim.poll() is None else "the victim process was killed"
            finally:
                victim.kill()
                victim.wait()
        return attack

    def runner_gone(work: Path) -> str | None:
        program = ("import os, signal, time\nprint(os.getpid(), flush=True)\n"
                   "for f in (os.setpgrp, lambda: signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)):\n"
                   "    try:\n        f()\n    except Exception:\n        pass\ntime.sleep(60)\n")
        result = run_program(program, SandboxLimits(timeout=2.0, memory_mb=512))
        pid = int(result.stdout.split()[0])
        time.sleep(1.0)
        return f"runner {pid} still alive" if os.path.exists(f"/proc/{pid}") and \
            b"Z" != open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1].split()[0] else None

    shm = f"mergelm-attack-{uuid.uuid4().hex[:8]}"
    out = lambda name: str(outside / name)  # noqa: E731
    fake = {"prompt": "def f(x):\n", "test": "def check(candidate):\n    assert candidate(1) == 2\n", "entry_point": "f"}
    return [
        ("sandbox: pidfd_open + pidfd_send_signal", victim_survives("import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({pid}), 9)\n")),
        ("sandbox: os.kill of another process", victim_survives("import os\nos.kill({pid}, 9)\n")),
        ("sandbox: setpgrp, then kill the supervisor", runner_gone),
        ("sandbox: sqlite3 file: URI outside", holds("import sqlite3\nsqlite3.connect('file:{w}/x.db?mode=rwc', uri=True).execute('create table t(x)')\n", lambda: None)),
        ("sandbox: sqlite3 ATTACH outside", holds("import sqlite3\nc = sqlite3.connect(':memory:')\nc.execute(\"attach '{o}/attached.db' as a\")\nc.execute('create table a.t(x)')\n",
                                                 lambda: "attached" if os.path.exists(out("attached.db")) else None)),
        ("sandbox: readline history file outside", holds("import readline\nreadline.write_history_file('{o}/history')\n",
                                                        lambda: "written" if os.path.exists(out("history")) else None)),
        ("sandbox: shm_open leaves /dev/shm objects", holds(f"import _posixshmem, os\n_posixshmem.shm_open('/{shm}', os.O_CREAT | os.O_RDWR, 0o600)\n",
                                                           lambda: "left" if os.path.exists(f"/dev/shm/{shm}") else None)),
        ("sandbox: os.system", holds("import os\nos.system('touch {o}/system')\n", lambda: "ran" if os.path.exists(out("system")) else None)),
        ("sandbox: subprocess", holds("import subprocess\nsubprocess.run(['touch', '{o}/sub'])\n", lambda: "ran" if os.path.exists(out("sub")) else None)),
        ("sandbox: ctypes", holds("import ctypes\nctypes.CDLL(None).system(b'touch {o}/ctypes')\n", lambda: "ran" if os.path.exists(out("ctypes")) else None)),
        ("sandbox: read /etc/passwd", holds("print(open('/etc/passwd').read())\n")),
        ("sandbox: write outside the folder", holds("open('{o}/written', 'w').write('x')\n", lambda: "written" if os.path.exists(out("written")) else None)),
        ("sandbox: a socket", holds("import socket\nsocket.create_connection(('127.0.0.1', 22))\n")),
        ("sandbox: os._exit(0) before the tests", holds("import os\nos._exit(0)\nassert False\n")),
        ("sandbox: an object whose == is always True", holds(human_eval_program(fake, "    class A:\n        __eq__ = lambda s, o: True\n    return A()\n"))),
        ("sandbox: builtins patched for the tests", holds(human_eval_program({**fake, "test": "def check(candidate):\n    assert abs(candidate(1) - 2) < 1e-9\n"},
                                                                             "    import builtins\n    builtins.abs = lambda v: 0\n    return 99\n"))),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="run the cases whose name contains this text")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="mergelm_attacks_"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    build_models(root / "pristine")
    tried = right = 0
    wrong = []
    for case in cases():
        if args.only and args.only not in case.name:
            continue
        work = root / f"case{tried:03d}"
        shutil.copytree(root / "pristine", work, symlinks=True)
        before = snapshot(work / "models")
        problem = None
        try:
            case.setup(work)
            code, err, escaped = _run(case, work)
            expected = case.expect if isinstance(case.expect, tuple) else (case.expect,)
            lines = [line for line in err.splitlines() if line.strip() and "warning" not in line.lower()
                     and " - INFO - " not in line]   # the LLM scripts log their configuration first
            if lines and lines[0].startswith("usage:"):   # argparse: its usage block, then one error line
                lines = [line for line in lines if ": error:" in line] or lines
            if escaped:
                problem = "traceback: " + escaped.strip().splitlines()[-1][:200]
            elif code not in expected:
                problem = f"exit status {code}, expected {case.expect}: {err.strip()[-200:]}"
            elif "Traceback" in err:
                problem = "a traceback on stderr"
            elif case.one_line and code != 0 and (len(lines) != 1 or len(lines[0]) > 2500):
                problem = f"{len(lines)} lines / {sum(map(len, lines))} characters of error on stderr"
            elif case.says and case.says not in err:
                problem = f"stderr does not say {case.says!r}: {err.strip()[:200]}"
            elif snapshot(work / "models") != before:
                problem = "an input changed"
            elif [p for p in work.rglob(".*partial-*")]:
                problem = "a staging folder was left"
            else:
                problem = case.check(work)
        finally:
            for lock in HELD:
                lock.release()
            HELD.clear()
        tried += 1
        right += problem is None
        print(f"{'ok   ' if problem is None else 'WRONG'} {case.name}" + (f": {problem}" if problem else ""), flush=True)
        if problem:
            wrong.append(case.name)
    outside = root / "outside"
    outside.mkdir()
    for name, attack in sandbox_cases(outside):
        if args.only and args.only not in name:
            continue
        work = root / f"case{tried:03d}"
        work.mkdir()
        try:
            problem = attack(work)
        except Exception as error:  # the attack harness itself failed: count as wrong
            problem = f"harness error {type(error).__name__}: {error}"
        for leftover in outside.iterdir():   # what an escape created must not fail the next case
            leftover.unlink()
        tried += 1
        right += problem is None
        print(f"{'ok   ' if problem is None else 'WRONG'} {name}" + (f": {problem}" if problem else ""), flush=True)
        if problem:
            wrong.append(name)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(f"tried {tried}, right {right}" + (f"; wrong: {', '.join(wrong)}" if wrong else ""))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
