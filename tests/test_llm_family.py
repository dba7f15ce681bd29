"""The LLM miniature's family builder: split rules, response format, prompt masking, answer NLL, resumable build."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.llm_helpers import save_tiny_llama, write_jsonl
from utils.llm.benchmarks import gsm8k_response
from utils.llm.family import ExpertSpec, mbpp_train_records, training_pairs
from utils.llm.nll import answer_nll, encode_pair

CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def mbpp(task_id: int) -> dict:
    return {"task_id": task_id, "text": f"task {task_id}", "code": f"def f{task_id}():\r\n    return {task_id}",
            "test_list": [f"assert f{task_id}() == {task_id}"]}


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "gsm8k_train.jsonl", [
        {"question": "Ann has 2 apples and buys 3. How many?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
        {"question": "What is 1,000 + 234?", "answer": "1000+234=<<1000+234=1234>>1234\n#### 1,234"}])
    write_jsonl(folder / "mbpp_full.jsonl", [mbpp(i) for i in (1, 10, 11, 510, 511, 600, 601, 974)])
    return folder


@pytest.fixture()
def chat_model(tmp_path: Path) -> Path:
    folder = save_tiny_llama(tmp_path / "base", seed=0, with_pad=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_gsm8k_response_drops_annotations_and_states_the_answer_for_the_scorer():
    from utils.llm.scoring import extract_gsm8k_answer

    text = gsm8k_response("She has 4*3=<<4*3=12>>12 eggs.\n#### 1,212")
    assert text == "She has 4*3=12 eggs.\nThe answer is: 1212"
    assert extract_gsm8k_answer(text) == 1212


def test_mbpp_training_data_never_contains_test_or_prompt_task_ids(data_dir):
    records = [json.loads(line) for line in (data_dir / "mbpp_full.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in mbpp_train_records(records)] == [511, 600, 601, 974]
    pairs = training_pairs("mbpp_train", "mbpp", data_dir)
    assert len(pairs) == 4 and "task 511" in pairs[0][0] and pairs[0][1].startswith("```python\ndef f511():")
    assert not any(f"task {i}\n" in prompt for prompt, _ in pairs for i in (1, 10, 11, 510))
    with pytest.raises(ValueError, match="unknown training dataset"):
        training_pairs("gsm8k_test", "gsm8k", data_dir)


def test_prompt_tokens_are_masked_and_nll_matches_a_direct_computation(chat_model, data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    prompt, response = training_pairs("gsm8k_train", "gsm8k", data_dir)[0]
    ids, labels = encode_pair(tokenizer, prompt, response)
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    assert labels[:len(prompt_ids)] == [-100] * len(prompt_ids) and labels[len(prompt_ids):] == ids[len(prompt_ids):]
    assert tokenizer.decode(ids[len(prompt_ids):]).startswith(response)
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    pairs = training_pairs("gsm8k_train", "gsm8k", data_dir)
    result = answer_nll(model, tokenizer, pairs, batch_size=2)
    total, count = 0.0, 0
    for p, r in pairs:   # one at a time, no padding
        ids, labels = encode_pair(tokenizer, p, r)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
        for position, label in enumerate(labels[1:]):
            if label != -100:
                total -= float(logp[position, label])
                count += 1
    assert result["tokens"] == count and math.isclose(result["nll_per_token"], total / count, rel_tol=1e-5)


def test_build_trains_publishes_records_and_skips_what_exists(chat_model, data_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_llm_family", Path(__file__).resolve().parents[1] /
                                                  "scripts" / "build_llm_family.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root = tmp_path / "family"
    argv = ["--root", str(root), "--base", str(chat_model), "--data_dir", str(data_dir), "--experts", "math",
            "--max_steps", "2", "--no_progress"]
    assert script.main(argv) == 0
    record = json.loads((root / "math" / "family_expert.json").read_text())
    assert record["spec"]["max_steps"] == 2 and record["data"]["available"] == 2
    assert record["train_loss_first"] is not None
    from safetensors.torch import load_file
    before = load_file(chat_model / "model.safetensors")
    after = load_file(root / "math" / "model.safetensors")
    assert any(not torch.equal(before[n], after[n]) for n in before)     # a real update, all parameters trained
    assert not list(root.glob(".math.*"))
    assert script.main(argv) == 0 and "exists, skipped" in capsys.readouterr().out
    assert json.loads((root / "family.json").read_text())["experts"] == {"math": str(root / "math")}
    with pytest.raises(SystemExit) as error:
        script.main(argv[:-4] + ["--experts", "poetry"])
    assert error.value.code == 2


def test_miniature_curve_and_table_resume_and_never_select_on_reported_data(chat_model, data_dir, tmp_path):
    from utils.llm import miniature
    from utils.llm.family import sft_examples

    write_jsonl(data_dir / "gsm8k_test.jsonl", [{"question": "What is 7 + 1?", "answer": "7+1=8\n#### 8"}])
    write_jsonl(data_dir / "mbpp.test.jsonl", [mbpp(11)])
    family = {"math": chat_model, "code": chat_model}     # the base as its own "expert": δ = 0 gives p-invariance
    specs = {s: ExpertSpec(s, d, t, 1, 1, 512, 1e-5) for s, d, t in
             (("math", "gsm8k_train", "gsm8k"), ("code", "mbpp_train", "mbpp"))}
    budget = miniature.Budget(held_out=1, validation=2, batch_size=2)
    results = tmp_path / "results"
    files = miniature.drop_curve(family, chat_model, "math", ["gsm8k"], data_dir, results, rates=(0.0, 0.5),
                                 methods=("dare", "magnitude", "drop_only"), seeds=(0, 1), single_seed=("drop_only",),
                                 budget=budget, log=lambda *_: None)
    # p=0 once per method; random drops per seed; magnitude and single-seed methods one seed
    assert len(files) == 1 + 2 + 1 + 1 + 1 + 1
    values = {json.loads(f.read_text())["metrics"]["gsm8k"] for f in files}
    assert len(values) == 1                 # with δ = 0 every drop leaves the model unchanged
    stamp = {f: f.stat().st_mtime_ns for f in files}
    miniature.drop_curve(family, chat_model, "math", ["gsm8k"], data_dir, results, rates=(0.0, 0.5),
                         methods=("dare", "magnitude", "drop_only"), seeds=(0, 1), single_seed=("drop_only",),
                         budget=budget, log=lambda *_: None)
    assert {f: f.stat().st_mtime_ns for f in files} == stamp    # resumed: nothing recomputed
    grid = {"task_arithmetic": [{"options": {"scaling_coefficient": 0.5}}, {"options": {"scaling_coefficient": 1.0}}],
            "iso_c": [{"parameters": {"scaling_factor": 1.0}}]}
    selection = miniature.merge_table(family, specs, chat_model, data_dir, results, budget=budget, grid=grid,
                                      dare_rate=0.5, log=lambda *_: None)["rows"]
    assert set(selection) == {"base", "math", "code", "task_arithmetic", "task_arithmetic + DARE", "iso_c",
                              "iso_c + DARE"}
    assert set(selection["task_arithmetic"]["held_out"]) == {"gsm8k", "mbpp", "human_eval"}
    assert selection["task_arithmetic"]["candidates"] == 2 and selection["iso_c + DARE"]["dare_rate"] == 0.5
    # selection read validation only: the select files hold no held-out benchmark
    for path in (results / "merge_table" / "select").glob("*.json"):
        assert set(json.loads(path.read_text())["metrics"]) == {"math_validation", "code_validation"}
    # validation problems are held back from training: never in the training rows
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    for skill, spec in specs.items():
        held = {tuple(encode_pair(tokenizer, *p)[0]) for p in miniature.validation_pairs(spec, data_dir, 10)}
        rows, counts = sft_examples(spec, tokenizer, data_dir)
        assert held and counts["held_back_validation"] == len(held) and not held & {tuple(r[0]) for r in rows}


def test_llm_miniature_tiny_runs_every_stage_and_resumes(tmp_path, capsys):
    """The one command in --tiny mode with a small plan: family, curves, magnitude study, table, report; a second
    run recomputes nothing (result files untouched) and the report's numbers are the result files'."""
    import yaml

    import scripts.llm_miniature as command
    from utils.llm.miniature import CONFIG

    plan = yaml.safe_load(CONFIG.read_text())
    for block in ("curve", "magnitude_study"):
        plan[block]["rates"] = [0.0, 0.9]
    plan["curve"]["methods"] = ["dare", "drop_only", "magnitude"]
    plan["seeds"] = [0, 1]
    plan["merge"]["grid"] = {"task_arithmetic": [{"options": {"scaling_coefficient": 0.5}}],
                             "tsv_merging": [{"parameters": {"alpha": 1.0}}]}
    plan["generate"] = {"limit": 2, "max_tokens": 4, "models": {"math": ["gsm8k"]},
                        "merges": {"task_arithmetic": ["mbpp"]}}
    config = tmp_path / "plan.yaml"
    config.write_text(yaml.safe_dump(plan))
    root = tmp_path / "mini"
    assert command.main(["--tiny", "--root", str(root), "--config", str(config)]) == 0
    files = sorted((root / "drop_curve").glob("*.json")) + sorted((root / "merge_table").rglob("*.json"))
    # curve: math & code × (dare 1+2, drop_only 1+2, magnitude 1+1); magnitude study: math_large × (dare 1+2, drop_only 1+2)
    assert len(list((root / "drop_curve").glob("*.json"))) == 2 * 8 + 2 * 3
    stamps = {f: f.stat().st_mtime_ns for f in files}
    assert command.main(["--tiny", "--root", str(root), "--config", str(config)]) == 0
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    selection = json.loads((root / "merge_table" / "selection.json").read_text())["rows"]
    report = (root / "report.md").read_text()
    assert f"| tsv_merging + DARE | {selection['tsv_merging + DARE']['held_out']['gsm8k']:.3f} |" in report
    assert all((root / name).is_file() for name in ("drop_curve.png", "magnitude.png", "merge_table.png"))
    assert set(json.loads((root / "deltas.json").read_text())) >= {"math", "code", "math_large"}
    summaries = sorted((root / "generate").glob("save_gen_*/*/*/summary.json"))
    assert len(summaries) == 2 and "## Generation" in report
    assert all(json.loads(p.read_text())["metrics"]["num_examples"] == 2 for p in summaries)
