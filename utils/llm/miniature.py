"""The paper's LLM experiments in miniature: drop-rate curves and the merge table on the built family.

Every setting is one result file ``<results>/<experiment>/<setting>.json`` (resolved setting, seed, versions,
metrics), written atomically and skipped when it exists, so a run resumes where it stopped. Metrics are
teacher-forced answer NLL per token of reference solutions (utils/llm/nll.py): a forward pass, and a number
that moves at 135M parameters where exact match does not. What runs is declared in configs/llm_miniature.yaml.

Splits (never trained or selected on the reported data):
* reported (held-out): GSM8K *test* reference solutions (math), MBPP *test* reference code (task ids 11–510)
  and HumanEval canonical solutions (code), the first ``held_out`` problems of each;
* validation (hyperparameter selection of the merge table): the first ``validation`` problems of each
  expert's seeded shuffle of its training file, which its training never sees (utils/llm/family.py).

Drop-rate curve (the paper's Figure 1a): δ of one expert dropped with DARE (random drop + 1/(1−p) rescale),
DropOnly (no rescale), magnitude pruning (the int(n·p) smallest |δ|) and DARE on the fine-tuned weights
(``weight_format=finetuned_weight``), p ∈ rates, over seeds. Merge table (Table 1 shape): math & code merged
with every grid setting, scored on validation; per method the setting of lowest mean validation NLL is scored
on the held-out benchmarks, without and with DARE on both experts (``dare_rate``, mask seed 0).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

DROP_METHODS = {   # name → DareOptions fields
    "dare": {"rescale": True, "strategy": "random", "weight_format": "delta_weight"},
    "drop_only": {"rescale": False, "strategy": "random", "weight_format": "delta_weight"},
    "magnitude": {"rescale": False, "strategy": "magnitude", "weight_format": "delta_weight"},
    "dare_finetuned_weight": {"rescale": True, "strategy": "random", "weight_format": "finetuned_weight"},
}
RATES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99)
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "llm_miniature.yaml"


def load_plan(path: Path = CONFIG) -> dict:
    """configs/llm_miniature.yaml, checked: unknown drop methods and merge methods are named (ValueError)."""
    import yaml

    from model_merging_methods.registry import get_method

    plan = yaml.safe_load(path.read_text(encoding="utf-8"))
    for block in ("curve", "magnitude_study"):
        unknown = set(plan[block]["methods"]) - set(DROP_METHODS)
        if unknown:
            raise ValueError(f"{path}: {block}.methods: unknown {sorted(unknown)} (known: {sorted(DROP_METHODS)})")
    for method in plan["merge"]["grid"]:
        get_method(method)
    return plan


@dataclass(frozen=True)
class Budget:
    """How many problems each metric reads (fixed subsets: the first N in file order)."""

    held_out: int = 200
    validation: int = 100
    batch_size: int = 8


SKILL_BENCHMARKS = {"math": ("gsm8k",), "code": ("mbpp", "human_eval")}


def held_out_pairs(skill: str, data_dir: Path, limit: int) -> dict[str, list[tuple[str, str]]]:
    """Reported data of a skill's benchmarks: (chat prompt, reference response) of the first ``limit`` problems,
    exactly as ``--metric nll`` of the LLM scripts builds them (reference_sets)."""
    if skill not in SKILL_BENCHMARKS:
        raise ValueError(f"unknown skill {skill!r} (math, code)")
    return reference_sets(SKILL_BENCHMARKS[skill], data_dir, limit)


def validation_pairs(spec, data_dir: Path, limit: int) -> list[tuple[str, str]]:
    """The expert's held-back training problems (never trained on), in its seeded order."""
    from utils.llm.family import training_pairs

    pairs = training_pairs(spec.dataset, spec.template, data_dir)
    order = list(range(len(pairs)))
    random.Random(spec.seed).shuffle(order)
    return [pairs[i] for i in order[:min(limit, spec.held_back(len(pairs)))]]


class Evaluator:
    """One resident model: load a state dict into it, score NLL on fixed pair sets (no disk writes)."""

    def __init__(self, base: Path, batch_size: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        self.batch_size = batch_size

    def score(self, state: dict, sets: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
        from utils.llm.nll import answer_nll

        self.model.load_state_dict(state, strict=False)
        return {name: answer_nll(self.model, self.tokenizer, pairs, batch_size=self.batch_size)["nll_per_token"]
                for name, pairs in sets.items()}


def _state(folder: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def _write(path: Path, payload: dict) -> None:
    from utils.records import library_versions, write_json_atomic

    write_json_atomic(path, payload | {"versions": library_versions()})


def reference_sets(benchmarks, data_dir: Path, limit: int) -> dict[str, list[tuple[str, str]]]:
    """The first ``limit`` problems of each benchmark as (chat prompt, reference response)."""
    from utils.llm.benchmarks import load_dataset
    from utils.llm.nll import reference_pairs
    from utils.llm.prompts import load_task_config

    config = load_task_config()
    return {name: reference_pairs(name, load_dataset(name, data_dir=str(data_dir))[0][:limit], config)
            for name in benchmarks}


def delta_stats(family: dict[str, Path], base: Path, results: Path) -> dict:
    """‖δ‖₂, ‖δ‖₂ / ‖θ_pre‖₂ and mean |δ| of every expert (the magnitude study's x-axis); deltas.json."""
    import torch

    path = results / "deltas.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    missing = [name for name in family if name not in known]
    if missing:
        base_state = _state(base)
        for name in missing:
            expert = _state(family[name])
            square, base_square, absolute, count = 0.0, 0.0, 0.0, 0
            for key, value in expert.items():
                if key in base_state and value.is_floating_point():
                    delta = value.double() - base_state[key].double()
                    square += float(delta.pow(2).sum())
                    base_square += float(base_state[key].double().pow(2).sum())
                    absolute += float(delta.abs().sum())
                    count += delta.numel()
            known[name] = {"l2": square ** 0.5, "relative_l2": (square / base_square) ** 0.5,
                           "mean_abs": absolute / max(count, 1), "parameters": count}
        _write(path, {k: v for k, v in known.items() if k != "versions"})
        known = json.loads(path.read_text())
    return known


def drop_curve(family: dict[str, Path], base: Path, expert: str, benchmarks, data_dir: Path, results: Path, *,
               rates=RATES, methods=tuple(DROP_METHODS), seeds=(0, 1, 2), single_seed=(), budget: Budget = Budget(),
               log=print) -> list[Path]:
    """NLL of ``expert`` with its delta dropped, per (method, rate, seed); one result file each. p = 0 (the
    expert itself) is scored once and written for every method; methods in ``single_seed`` and magnitude pruning
    run one seed."""
    from model_merging_methods import DareOptions, dare_state_dict

    sets = reference_sets(benchmarks, data_dir, budget.held_out)
    evaluator, base_state, state, unchanged = None, None, None, None
    written = []
    for method in methods:
        random_drop = DROP_METHODS[method]["strategy"] == "random" and method not in single_seed
        for rate in rates:
            for seed in (seeds if rate and random_drop else seeds[:1]):
                path = results / "drop_curve" / f"{expert}__{method}__p{rate}__seed{seed}.json"
                written.append(path)
                if path.is_file():
                    continue
                if evaluator is None:
                    evaluator, base_state, state = Evaluator(base, budget.batch_size), _state(base), \
                        _state(family[expert])
                started = time.time()
                if rate:
                    dropped = dare_state_dict(state, base_state, DareOptions(drop_rate=rate, **DROP_METHODS[method]),
                                              seed=seed)
                    metrics = evaluator.score(dropped, sets)
                else:
                    unchanged = unchanged or evaluator.score(state, sets)
                    metrics = unchanged
                _write(path, {"experiment": "drop_curve", "expert": expert, "method": method, "drop_rate": rate,
                              "seed": seed, "model": str(family[expert]), "base": str(base),
                              "options": DROP_METHODS[method], "examples": {k: len(v) for k, v in sets.items()},
                              "metrics": metrics, "wall_seconds": round(time.time() - started, 2)})
                log(f"drop_curve {expert} {method} p={rate} seed={seed}: {metrics}")
    return written


def _merge(method: str, base: Path, base_state: dict, models: list[dict], setting: dict, dare_rate: float,
           seed: int) -> dict:
    """One merge of the table. The paper's methods get DARE through the library (as the engine applies it);
    methods that take recipe parameters get the experts DARE'd first (same masks: seed and model index);
    layer-aware ones (LiNeS) get each tensor's block from the base's config and names."""
    from model_merging_methods import DareOptions, MergeOptions, dare_state_dict, merge_state_dicts
    from model_merging_methods.registry import get_method
    from utils.recipes.architecture import block_layers, read_config

    dare = DareOptions(drop_rate=dare_rate) if dare_rate else None
    spec = get_method(method)
    if spec.kind == "group":
        if dare is not None:
            models = [dare_state_dict(m, base_state, dare, seed=seed, model_index=i) for i, m in enumerate(models)]
        layers = block_layers(read_config(base, "the base"), list(base_state), "the base") if spec.layer_aware else None
        return merge_state_dicts(method, base_state, models, parameters=setting.get("parameters", {}), seed=seed,
                                 layers=layers)
    return merge_state_dicts(method, base_state, models, MergeOptions(**setting.get("options", {})), dare=dare,
                             seed=seed)


def _label(setting: dict) -> str:
    values = {**setting.get("options", {}), **setting.get("parameters", {})}
    return "_".join(f"{k}{v}" for k, v in values.items()) or "default"


def merge_table(family: dict[str, Path], specs: dict, base: Path, data_dir: Path, results: Path, *, grid: dict,
                dare_rate: float = 0.9, experts=("math", "code"), seed: int = 0, budget: Budget = Budget(),
                log=print) -> dict:
    """Merge the experts with every grid setting and score validation only; per method the setting of lowest
    mean validation NLL is scored on the held-out benchmarks without and with DARE. Returns and writes the
    selection (selection.json); θ_pre and each expert alone are the reference rows."""
    validation = {f"{s}_validation": validation_pairs(specs[s], data_dir, budget.validation) for s in experts}
    held_out = held_out_pairs("math", data_dir, budget.held_out) | held_out_pairs("code", data_dir, budget.held_out)
    evaluator = Evaluator(base, budget.batch_size)
    base_state = _state(base)
    models = [_state(family[s]) for s in experts]
    folder = results / "merge_table"

    def mean_validation(metrics: dict) -> float:
        return sum(metrics[k] for k in validation) / len(validation)

    rows = {}
    for reference in ("base", *experts):   # the individual rows: θ_pre and each expert alone
        path = folder / f"reference__{reference}.json"
        if not path.is_file():
            state = base_state if reference == "base" else models[experts.index(reference)]
            _write(path, {"experiment": "merge_table", "method": reference, "dare_rate": 0.0, "setting": {},
                          "metrics": evaluator.score(state, validation | held_out)})
        record = json.loads(path.read_text())
        rows[reference] = {"setting": {}, "dare_rate": 0.0, "validation_mean_nll": mean_validation(record["metrics"]),
                           "held_out": {k: record["metrics"][k] for k in held_out}, "source": str(path)}
    for method, settings in grid.items():
        scored = []
        for setting in settings:
            path = folder / "select" / f"{method}__{_label(setting)}.json"
            if not path.is_file():
                started = time.time()
                merged = _merge(method, base, base_state, models, setting, 0.0, seed)
                merge_seconds = time.time() - started
                _write(path, {"experiment": "merge_table", "stage": "select", "method": method, "setting": setting,
                              "dare_rate": 0.0, "seed": seed, "metrics": evaluator.score(merged, validation),
                              "merge_seconds": round(merge_seconds, 2), "wall_seconds": round(time.time() - started, 2)})
            record = json.loads(path.read_text())
            scored.append((mean_validation(record["metrics"]), setting, path))
            log(f"merge_table select {method} {setting}: {record['metrics']}")
        best, setting, select_path = min(scored, key=lambda item: item[0])
        for rate in (0.0, dare_rate):
            path = folder / "report" / f"{method}__{_label(setting)}__dare{rate}.json"
            if not path.is_file():
                started = time.time()
                merged = _merge(method, base, base_state, models, setting, rate, seed)
                _write(path, {"experiment": "merge_table", "stage": "report", "method": method, "setting": setting,
                              "dare_rate": rate, "seed": seed, "selected_by": str(select_path),
                              "metrics": evaluator.score(merged, held_out),
                              "wall_seconds": round(time.time() - started, 2)})
            record = json.loads(path.read_text())
            rows[f"{method}{' + DARE' if rate else ''}"] = {
                "setting": setting, "dare_rate": rate, "validation_mean_nll": best, "held_out": record["metrics"],
                "source": str(path), "candidates": len(settings)}
            log(f"merge_table report {method} {setting} dare={rate}: {record['metrics']}")
    selection = {"selected_on": "mean validation NLL (held-back train problems of each expert)",
                 "reported_on": sorted(held_out), "experts": list(experts), "dare_rate": dare_rate, "rows": rows}
    previous = json.loads((folder / "selection.json").read_text()) if (folder / "selection.json").is_file() else {}
    if {k: v for k, v in previous.items() if k != "versions"} != selection:   # a resumed run rewrites nothing
        _write(folder / "selection.json", selection)
    return selection


def generate_stage(family: dict[str, Path], base: Path, data_dir: Path, results: Path, plan: dict, *,
                   python: str, script: Path, tiny: bool = False, log=print) -> list[Path]:
    """Exact match / pass@1 with inference_llms_instruct_math_code.py (chat prompts, greedy) on the first
    ``limit`` problems of each listed benchmark, for θ_pre, the listed experts and the merge table's selected
    setting of each listed method (materialised once under ``generate/models/``). The script resumes from its
    records; the summaries land under ``generate/save_gen_*``."""
    import subprocess

    from utils.records import write_folder_atomic

    settings = plan["generate"]
    folder = results / "generate"
    models = {name: (base if name == "base" else family[name], benches) for name, benches in settings["models"].items()}
    selection_file = results / "merge_table" / "selection.json"
    if settings.get("merges") and selection_file.is_file():
        rows = json.loads(selection_file.read_text())["rows"]
        for method, benches in settings["merges"].items():
            target = folder / "models" / f"merged_{method}"
            if not (target / "config.json").is_file():
                def write(staging: Path, method=method) -> None:
                    from transformers import AutoModelForCausalLM, AutoTokenizer
                    experts = json.loads(selection_file.read_text())["experts"]
                    merged = _merge(method, base, _state(base), [_state(family[e]) for e in experts],
                                    rows[method]["setting"], 0.0, 0)
                    model = AutoModelForCausalLM.from_pretrained(base)
                    model.load_state_dict(merged, strict=False)
                    model.save_pretrained(staging, safe_serialization=True)
                    AutoTokenizer.from_pretrained(base).save_pretrained(staging)
                write_folder_atomic(target, write, overwrite=False, inputs={"the base model": base})
            models[f"merged_{method}"] = (target, benches)
    summaries = []
    for name, (model, benches) in models.items():
        for bench in benches:
            command = [python, str(script), "--finetuned_model_name", str(model), "--dataset_name", bench,
                       "--end_index", str(settings["limit"]), "--prompt_format", "chat", "--backend", "transformers",
                       "--device", "cpu", "--max_tokens", str(settings["max_tokens"]), "--batch_size", "8",
                       "--data_dir", str(data_dir), "--save_dir", str(folder)]
            log(f"generate {name} {bench}: {' '.join(command[1:])}")
            if subprocess.run(command).returncode != 0:
                raise RuntimeError(f"generation of {name} on {bench} failed (command above)")
            summaries += list(folder.glob(f"save_gen_*/{bench}/{Path(model).name}_inference_mask_0.0*/summary.json"))
    return summaries
