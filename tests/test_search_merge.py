"""Merge search: templates, in-memory merges equal to merges on disk, CMA-ES / grid search with resume, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import merge_models
import search_merge
from glue_helpers import glue_slice, tiny_bert
from utils.recipes.schema import parse_recipe
from utils.search import GlueEvalOptions, GlueEvaluator, ResidentModels, Template, TemplateError, merge_into

TASKS = ("mrpc", "sst2")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny bare BERT encoder (the base, names without 'bert.') and two noisy task classifiers with their
    tokenizer, on slices of the real MRPC and SST-2 files; plus the base as a classifier (for merges to disk)."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    root = tmp_path_factory.mktemp("search")
    glue = glue_slice(root)
    base = tiny_bert(root, glue)
    tokenizer = AutoTokenizer.from_pretrained(base)
    folders = {"base": base, "glue": glue, "root": root}
    torch.manual_seed(1)
    classifier = BertForSequenceClassification.from_pretrained(base, num_labels=2)
    classifier.save_pretrained(root / "base_cls")
    folders["base_cls"] = root / "base_cls"
    for index, task in enumerate(TASKS):
        model = BertForSequenceClassification.from_pretrained(root / "base_cls")
        generator = torch.Generator().manual_seed(10 + index)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(root / task)
        tokenizer.save_pretrained(root / task)
        folders[task] = root / task
    return folders


def ties_template(family, base_key="base") -> str:
    return f"""merge_method: dare_ties
base_model: {family[base_key]}
models:
  - model: {family[base_key]}
  - model: ${{mrpc}}
    parameters: {{weight: {{free: {{range: [0.2, 1.5]}}}}, density: {{free: {{range: [0.2, 1.0], init: 0.6}}}}}}
  - model: ${{sst2}}
    parameters: {{weight: {{free: {{range: [0.2, 1.5]}}}}, density: {{free: {{range: [0.2, 1.0], init: 0.6}}}}}}
parameters: {{normalize: true}}
dtype: float32
"""


def test_template_free_parameters_shared_names_choices_and_errors(tmp_path):
    text = """merge_method: {free: {choices: [ties, dare_ties]}}
base_model: b
models:
  - model: b
  - model: x
    parameters: {weight: {free: {name: lam, range: [0, 2]}}, density: [{free: {range: [0.1, 0.5]}}, 1.0]}
  - model: y
    parameters: {weight: {free: {name: lam, range: [0, 2]}}}
"""
    template = Template.load(write(tmp_path / "t.yml", text))
    assert [p.name for p in template.space.parameters] == ["merge_method", "lam", "models[1].parameters.density[0]"]
    values = template.space.values([0.9, 0.25, 1.0])
    assert values == {"merge_method": "dare_ties", "lam": 0.5, "models[1].parameters.density[0]": 0.5}
    document = template.instantiate(values)
    assert document["merge_method"] == "dare_ties"
    assert document["models"][1]["parameters"] == {"weight": 0.5, "density": [0.5, 1.0]}
    assert document["models"][2]["parameters"] == {"weight": 0.5}
    assert template.space.point(values) == pytest.approx([0.75, 0.25, 1.0])
    with pytest.raises(TemplateError, match=r"free parameter models\[1\].parameters.weight has no range"):
        Template.load(write(tmp_path / "bad.yml", text.replace("{name: lam, range: [0, 2]}}, density", "{}}, density")))
    with pytest.raises(TemplateError, match="shares the name 'lam'"):
        Template.load(write(tmp_path / "bad2.yml", text.replace("{name: lam, range: [0, 2]}}}\n", "{name: lam, range: [0, 3]}}}\n")))
    with pytest.raises(TemplateError, match=r"variable \$\{MISSING\} is not set"):
        Template.load(write(tmp_path / "bad3.yml", text.replace("model: x", "model: ${MISSING}")))


EXTRA = {"breadcrumbs_ties": ", gamma: 0.05", "della": ", epsilon: 0.1"}
# the paper's DARE before a paper method (inside its float32 merge) and before a mergekit method (its inputs)
DOCUMENT = {"ties_merging": "dare: {drop_rate: 0.3}\n", "breadcrumbs_ties": "dare: {drop_rate: 0.3}\n"}


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "breadcrumbs_ties", "della", "ties_merging"])
def test_in_memory_merge_equals_merge_to_disk_and_its_evaluation(family, tmp_path, method):
    """The recipe merged into the resident classifiers' shared encoder equals the recipe merged to disk (every
    encoder tensor bit for bit), and GLUE validation of the resident model equals validation of that folder."""
    values = {"weight": [0.7, 1.2], "density": [0.5, 0.8]}
    models = "\n".join(f"  - model: {family[t]}\n    parameters: {{weight: {w}, density: {d}{EXTRA.get(method, '')}}}"
                       for t, w, d in zip(TASKS, values["weight"], values["density"]))
    text = (f"merge_method: {method}\nbase_model: {family['base_cls']}\nmodels:\n  - model: {family['base_cls']}\n{models}\n"
            f"dtype: float32\n{DOCUMENT.get(method, '')}")
    recipe_path = write(tmp_path / "recipe.yml", text)
    assert merge_models.main(["--config", str(recipe_path), "--output_dir", str(tmp_path / "out"), "--no_progress",
                              "--seed", "3"]) == 0
    on_disk = load_file(tmp_path / "out/model.safetensors")
    options = GlueEvalOptions(glue_dir=str(family["glue"]), batch_size=16)
    resident = GlueEvaluator({t: family[t] for t in TASKS}, options)
    models_ = ResidentModels(resident.exclude, resident.prefix)
    recipe = parse_recipe(yaml.safe_load(text), "inline")
    report = merge_into(resident.target, recipe, models_, seed=3)
    state = resident.target.state_dict()
    encoder = [name for name in on_disk if name.startswith("bert.")]
    assert encoder and report.tensors == len(encoder)
    for name in encoder:
        assert torch.equal(state[name], on_disk[name]), name
    for task in TASKS:      # the shared encoder serves every task; heads stay each expert's
        assert torch.equal(resident.models[task].bert.encoder.layer[0].output.dense.weight,
                           on_disk["bert.encoder.layer.0.output.dense.weight"])
        assert torch.equal(resident.models[task].classifier.weight, load_file(family[task] / "model.safetensors")["classifier.weight"])
    in_memory = resident.evaluate("validation")
    folder_eval = GlueEvaluator({t: family[t] for t in TASKS}, options)
    folder_eval.target.load_state_dict({k: v for k, v in on_disk.items() if k.startswith("bert.")}, strict=False)
    assert folder_eval.evaluate("validation") == in_memory
    again = merge_into(resident.target, recipe, models_, seed=3)
    assert again.disk_reads == 0          # every tensor stays resident after the first merge
    assert all(torch.equal(resident.target.state_dict()[name], on_disk[name]) for name in encoder)   # kept draws / ranks
    assert bool(models_._sorted) == (method in ("ties", "breadcrumbs_ties"))      # rank cuts read the kept sorted |δ|
    assert bool(models_._slots) == (method in ("dare_ties", "della"))             # draws made once
    if method == "ties":        # another density reuses the kept sorted |δ|: still the merge on disk
        other = text.replace("density: 0.5", "density: 0.3").replace("density: 0.8", "density: 0.05")
        write(recipe_path, other)
        assert merge_models.main(["--config", str(recipe_path), "--output_dir", str(tmp_path / "out2"), "--no_progress",
                                  "--seed", "3"]) == 0
        merge_into(resident.target, parse_recipe(yaml.safe_load(other), "inline"), models_, seed=3)
        second = load_file(tmp_path / "out2/model.safetensors")
        assert all(torch.equal(resident.target.state_dict()[name], second[name]) for name in encoder)
        assert not all(torch.equal(second[name], on_disk[name]) for name in encoder)
        # the streaming tie order (flat order) reads its own kept sort: still the merge on disk with that order
        assert merge_models.main(["--config", str(recipe_path), "--output_dir", str(tmp_path / "out3"), "--no_progress",
                                  "--seed", "3", "--tie_order", "index"]) == 0
        merge_into(resident.target, parse_recipe(yaml.safe_load(other), "inline"), models_, seed=3, tie_order="index")
        third = load_file(tmp_path / "out3/model.safetensors")
        assert all(torch.equal(resident.target.state_dict()[name], third[name]) for name in encoder)


def run_search(family, out: Path, budget: int, extra=(), template=None) -> int:
    template = template or write(out.parent / f"{out.name}_template.yml", ties_template(family))
    return search_merge.main(["--template", str(template), "--output_dir", str(out), "--fitness", "mrpc=1", "sst2:accuracy=0.5",
                              "--experts", f"mrpc={family['mrpc']}", f"sst2={family['sst2']}",
                              "--glue_dir", str(family["glue"]), "--batch_size", "16", "--budget", str(budget),
                              "--popsize", "3", "--seed", "1", *extra])


def test_cma_search_resumes_as_if_never_stopped_and_writes_outputs(family, tmp_path):
    assert run_search(family, tmp_path / "whole", 6) == 0
    assert run_search(family, tmp_path / "split", 4) == 0   # stops inside generation 1
    assert run_search(family, tmp_path / "split", 6, ["--resume"]) == 0
    rows = {name: [json.loads(line) for line in (tmp_path / name / "history.jsonl").read_text().splitlines()]
            for name in ("whole", "split")}
    assert rows["whole"][0]["kind"] == "header" and len(rows["whole"]) == 7 and len(rows["split"]) == 7
    for a, b in zip(rows["whole"][1:], rows["split"][1:]):
        assert a["point"] == pytest.approx(b["point"], abs=1e-12) and a["fitness"] == pytest.approx(b["fitness"])
    trials = rows["whole"][1:]
    assert trials[0]["disk_reads"] > 0 and all(t["disk_reads"] == 0 for t in trials[1:])
    for trial in trials:   # fitness = MRPC main + 0.5 · SST-2 accuracy of the trial's validation metrics
        assert trial["fitness"] == pytest.approx(trial["metrics"]["mrpc"]["main"] + 0.5 * trial["metrics"]["sst2"]["accuracy"])
    result = json.loads((tmp_path / "whole/search_result.json").read_text())
    best = max(trials, key=lambda t: t["fitness"])
    assert result["best"]["fitness"] == best["fitness"] and result["best"]["values"] == best["values"]
    assert set(result["best"]["report_metrics"]) == set(TASKS) and (tmp_path / "whole/history.png").stat().st_size > 0
    recipe = yaml.safe_load((tmp_path / "whole/best_recipe.yml").read_text())
    assert recipe["models"][1]["parameters"]["weight"] == pytest.approx(best["values"]["models[1].parameters.weight"])


def test_grid_search_and_comparison_table(family, tmp_path, capsys):
    template = write(tmp_path / "ta.yml", f"""merge_method: task_arithmetic
base_model: {family['base']}
models:
  - model: {family['base']}
  - model: ${{mrpc}}
    parameters: {{weight: {{free: {{name: lambda, range: [0.0, 1.0]}}}}}}
  - model: ${{sst2}}
    parameters: {{weight: {{free: {{name: lambda, range: [0.0, 1.0]}}}}}}
dtype: float32
""")
    assert run_search(family, tmp_path / "grid", 3, ["--sampler", "grid"], template) == 0
    trials = [json.loads(line) for line in (tmp_path / "grid/history.jsonl").read_text().splitlines()][1:]
    assert [t["values"]["lambda"] for t in trials] == [0.0, 0.5, 1.0]
    assert len({json.dumps(t["metrics"], sort_keys=True) for t in trials}) == 3     # λ changes the merged model
    assert run_search(family, tmp_path / "grid2", 3, ["--sampler", "grid", "--workers", "2"], template) == 0
    parallel = [json.loads(line) for line in (tmp_path / "grid2/history.jsonl").read_text().splitlines()][1:]
    assert [t["metrics"] for t in parallel] == [t["metrics"] for t in trials]      # two worker processes, same trials
    assert run_search(family, tmp_path / "cma", 3, ["--compare", str(tmp_path / "grid")]) == 0
    table = (tmp_path / "cma/comparison.md").read_text()
    assert "| cma | cma | 3 |" in table and "| grid | grid | 3 |" in table


def test_bad_input_exits_2_with_one_line(family, tmp_path, capsys):
    def status_and_line(argv_extra, template_text=None, fitness=None):
        template = write(tmp_path / f"t{len(list(tmp_path.iterdir()))}.yml", template_text or ties_template(family))
        argv = ["--template", str(template), "--output_dir", str(tmp_path / "o"), "--fitness", *(fitness or ["mrpc=1"]),
                "--experts", f"mrpc={family['mrpc']}", f"sst2={family['sst2']}", "--glue_dir", str(family["glue"]),
                "--budget", "3", "--popsize", "3", *argv_extra]
        status = search_merge.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        return status, err

    status, err = status_and_line([], ties_template(family).replace("{range: [0.2, 1.5]}", "{}", 1))
    assert status == 2 and len(err) == 1 and "models[1].parameters.weight has no range" in err[0]
    status, err = status_and_line([], fitness=["qqp=1"])
    assert status == 2 and len(err) == 1 and "unknown task 'qqp'" in err[0]
    status, err = status_and_line([], fitness=["mrpc:bleu=1"])
    assert status == 2 and len(err) == 1 and "unknown metric 'bleu'" in err[0]
    assert not (tmp_path / "o").exists()
    assert status_and_line([])[0] == 0
    status, err = status_and_line(["--resume"], ties_template(family).replace("[0.2, 1.5]", "[0.3, 1.5]"))
    assert status == 2 and len(err) == 1 and "comes from another template" in err[0]


def test_decoder_search_judged_by_lm_eval_in_memory(tmp_path):
    """A resident tiny Llama merged in memory and judged by lm-eval (answer NLL on GSM8K train, report on test):
    each trial's fitness is −NLL, and the best trial's report equals lm-eval on that merge written to disk."""
    import shutil

    from llm_helpers import save_tiny_llama, write_data_dir
    from utils.lm_eval import LmEvalOptions, evaluate_folder

    base = save_tiny_llama(tmp_path / "base", seed=0)
    models = {name: save_tiny_llama(tmp_path / name, seed=seed, base=base, scale=0.05) for name, seed in (("a", 1), ("b", 2))}
    data = write_data_dir(tmp_path / "data")
    shutil.copy(data / "gsm8k_test.jsonl", data / "gsm8k_train.jsonl")
    template = write(tmp_path / "t.yml", f"""merge_method: task_arithmetic
base_model: {base}
models:
  - model: {base}
  - model: {models['a']}
    parameters: {{weight: {{free: {{name: lambda, range: [0.0, 1.0]}}}}}}
  - model: {models['b']}
    parameters: {{weight: {{free: {{name: lambda, range: [0.0, 1.0]}}}}}}
dtype: float32
""")
    out = tmp_path / "search"
    assert search_merge.main(["--template", str(template), "--output_dir", str(out), "--evaluator", "lm_eval",
                              "--model", str(base), "--lm_eval_tasks", "gsm8k_train_answer_nll",
                              "--lm_eval_report_tasks", "gsm8k_answer_nll", "--limit", "2", "--data_dir", str(data),
                              "--fitness", "gsm8k_train_answer_nll:answer_nll,none=-1", "--sampler", "grid",
                              "--grid_points", "2", "--budget", "2"]) == 0
    trials = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()][1:]
    assert [t["values"]["lambda"] for t in trials] == [0.0, 1.0]
    for trial in trials:
        assert trial["fitness"] == -trial["metrics"]["gsm8k_train_answer_nll"]["answer_nll,none"]
    assert trials[0]["fitness"] != trials[1]["fitness"]
    result = json.loads((out / "search_result.json").read_text())
    best = max(trials, key=lambda t: t["fitness"])
    assert merge_models.main(["--config", str(out / "best_recipe.yml"), "--output_dir", str(tmp_path / "merged"),
                              "--no_progress"]) == 0
    shutil.copy(base / "tokenizer.json", tmp_path / "merged/tokenizer.json")
    shutil.copy(base / "tokenizer_config.json", tmp_path / "merged/tokenizer_config.json")
    on_disk = evaluate_folder(tmp_path / "merged", LmEvalOptions(tasks=("gsm8k_answer_nll",), limit=2, data_dir=str(data)))
    assert result["best"]["values"] == best["values"]
    assert result["best"]["report_metrics"]["gsm8k_answer_nll"]["answer_nll,none"] == \
        on_disk["results"]["gsm8k_answer_nll"]["answer_nll,none"]
