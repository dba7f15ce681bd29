"""scripts/small_family_merge.sh end to end on the tiny fixtures: two real (few-step) fine-tunes of a tiny chat
Llama by the family builder, their merge by merge_models.py (closed form checked), what it prints, reruns, refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.llm_helpers import save_tiny_llama, write_jsonl

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "small_family_merge.sh"
CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture()
def fixtures(tmp_path: Path) -> dict:
    base = save_tiny_llama(tmp_path / "base", seed=0, with_pad=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "data"
    write_jsonl(data / "gsm8k_train.jsonl", [
        {"question": "Ann has 2 apples and buys 3. How many?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
        {"question": "What is 1,000 + 234?", "answer": "1000+234=<<1000+234=1234>>1234\n#### 1,234"}])
    write_jsonl(data / "mbpp_full.jsonl", [{"task_id": i, "text": f"task {i}", "code": f"def f{i}():\r\n    return {i}",
                                            "test_list": [f"assert f{i}() == {i}"]} for i in (11, 511, 600, 601, 974)])
    return {"base": base, "data": data}


def run_script(out: Path, fixtures: dict, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, "BASE": str(fixtures["base"]), "DATA_DIR": str(fixtures["data"]),
                   "STEPS": "2", **env}
    return subprocess.run(["bash", str(SCRIPT), str(out)], env=environment, capture_output=True, text=True, timeout=600)


def test_two_real_fine_tunes_and_their_merge_in_one_command(fixtures, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    done = run_script(out, fixtures, DROP_RATE="0")
    assert done.returncode == 0, done.stderr[-3000:]
    family, merged = out / "family_steps2", out / "merged_task_arithmetic_steps2"
    for name in ("math", "code"):
        record = json.loads((family / name / "family_expert.json").read_text())
        assert record["spec"]["max_steps"] == 2 and record["base"] == str(fixtures["base"])
    base, math_, code = (load_file(folder / "model.safetensors") for folder in (fixtures["base"], family / "math", family / "code"))
    assert any(not torch.equal(base[n], math_[n]) for n in base) and any(not torch.equal(base[n], code[n]) for n in base)
    result = load_file(merged / "model.safetensors")
    assert result.keys() == base.keys()
    for name, theta in base.items():           # task arithmetic, λ = 1: θ + (θ_math − θ) + (θ_code − θ)
        torch.testing.assert_close(result[name], theta + (math_[name] - theta) + (code[name] - theta), rtol=0, atol=1e-6)
    manifest = json.loads((merged / "merge_manifest.json").read_text())
    assert manifest["method"]["name"] == "task_arithmetic"
    for line in (f"math expert    {family / 'math'}", f"code expert    {family / 'code'}", f"merged model   {merged}"):
        assert line in done.stdout

    again = run_script(out, fixtures, DROP_RATE="0")             # resumable: nothing is redone
    assert again.returncode == 0 and "exists, skipped" in again.stdout and f"{merged} exists, kept" in again.stdout

    dare = run_script(out, fixtures)                             # the default: DARE 0.9 + task arithmetic on the same family
    assert dare.returncode == 0, dare.stderr[-3000:]
    manifest = json.loads((out / "merged_dare0.9_task_arithmetic_steps2" / "merge_manifest.json").read_text())
    assert manifest["dare"]["resolved"]["drop_rate"] == [0.9, 0.9] and manifest["dare"]["resolved"]["rescale"]


def test_bad_steps_are_refused_before_anything_runs(fixtures, tmp_path):
    done = run_script(tmp_path / "out", fixtures, STEPS="two")
    assert done.returncode == 2 and "STEPS must be a positive integer, got 'two'" in done.stderr
    assert not (tmp_path / "out").exists()
