"""The paper's LLM experiments in miniature: drop-rate curves and the merge table on the built family.

Every setting is one result file ``<results>/<experiment>/<setting>.json`` (resolved setting, seed, versions,
metrics), written atomically and skipped when it exists, so a run resumes where it stopped. Metrics are
teacher-forced answer NLL per token (utils/llm/nll.answer_nll): a forward pass, and a number that moves at
135M parameters where exact match does not.

Splits (never trained or selected on the reported data):
* reported (held-out): GSM8K *test* reference solutions (math), MBPP *test* reference code (task ids 11–510)
  and HumanEval canonical solutions (code);
* validation (hyperparameter selection of the merge table): the first ``validation_size`` problems of each
  expert's seeded shuffle of its training file, which its training never sees (utils/llm/family.py).

Drop-rate curve (the paper's Figure 1a): δ of one expert dropped with DARE (random drop + 1/(1−p) rescale),
DropOnly (no rescale), magnitude pruning (the int(n·p) smallest |δ|) and DARE on the fine-tuned weights
(``weight_format=finetuned_weight``), p ∈ rates, over seeds. Merge table (Table 1 shape): math & code merged
with each method of ``MERGE_GRID`` (without and with DARE), the setting with the lowest mean validation NLL
reported on the held-out data.
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
# method → list of (options, label); every setting is run without DARE and with DARE at each rate of DARE_RATES
MERGE_GRID = {
    "average_merging": [{}],
    "task_arithmetic": [{"scaling_coefficient": s} for s in (0.5, 0.8, 1.0)],
    "ties_merging": [{"scaling_coefficient": s, "density": d} for s in (0.5, 1.0) for d in (0.2, 0.5)],
}
DARE_RATES = (0.0, 0.9)


@dataclass(frozen=True)
class Budget:
    """How many problems each metric reads (fixed subsets: the first N in file order)."""

    held_out: int = 200
    validation: int = 100
    batch_size: int = 8


def held_out_pairs(skill: str, data_dir: Path, limit: int) -> dict[str, list[tuple[str, str]]]:
    """Reported data per benchmark: (chat prompt, reference response) of the first ``limit`` problems, exactly as
    ``--metric nll`` of the LLM scripts builds them (utils/llm/nll.reference_pairs)."""
    from utils.llm.benchmarks import load_dataset
    from utils.llm.nll import reference_pairs
    from utils.llm.prompts import load_task_config

    benchmarks = {"math": ("gsm8k",), "code": ("mbpp", "human_eval")}
    if skill not in benchmarks:
        raise ValueError(f"unknown skill {skill!r} (math, code)")
    config = load_task_config()
    return {name: reference_pairs(name, load_dataset(name, data_dir=str(data_dir))[0][:limit], config)
            for name in benchmarks[skill]}


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


def drop_curve(family: dict[str, Path], base: Path, skill: str, data_dir: Path, results: Path, *,
               rates=RATES, methods=tuple(DROP_METHODS), seeds=(0, 1, 2), budget: Budget = Budget(),
               log=print) -> list[Path]:
    """NLL of the `skill` expert with its delta dropped, per (method, rate, seed); one result file each."""
    from model_merging_methods import DareOptions, dare_state_dict

    sets = held_out_pairs(skill, data_dir, budget.held_out)
    evaluator, base_state, expert = None, None, None
    written = []
    for method in methods:
        for rate in rates:
            for seed in (seeds if rate and DROP_METHODS[method]["strategy"] == "random" else seeds[:1]):
                path = results / "drop_curve" / f"{skill}__{method}__p{rate}__seed{seed}.json"
                written.append(path)
                if path.is_file():
                    continue
                if evaluator is None:
                    evaluator, base_state, expert = Evaluator(base, budget.batch_size), _state(base), \
                        _state(family[skill])
                started = time.time()
                state = dare_state_dict(expert, base_state, DareOptions(drop_rate=rate, **DROP_METHODS[method]),
                                        seed=seed) if rate else expert
                metrics = evaluator.score(state, sets)
                _write(path, {"experiment": "drop_curve", "skill": skill, "method": method, "drop_rate": rate,
                              "seed": seed, "expert": str(family[skill]), "base": str(base),
                              "examples": {k: len(v) for k, v in sets.items()}, "metrics": metrics,
                              "wall_seconds": round(time.time() - started, 2)})
                log(f"drop_curve {skill} {method} p={rate} seed={seed}: {metrics}")
    return written


def merge_table(family: dict[str, Path], specs: dict, base: Path, data_dir: Path, results: Path, *,
                grid: dict = MERGE_GRID, dare_rates=DARE_RATES, seed: int = 0, budget: Budget = Budget(),
                log=print) -> dict:
    """Merge math & code with every grid setting (± DARE); score validation and held-out NLL; pick per method
    (and DARE on/off) the setting of lowest mean validation NLL. Returns and writes the selection."""
    from model_merging_methods import DareOptions, MergeOptions, merge_state_dicts

    skills = ("math", "code")
    validation = {f"{s}_validation": validation_pairs(specs[s], data_dir, budget.validation) for s in skills}
    held_out = held_out_pairs("math", data_dir, budget.held_out) | held_out_pairs("code", data_dir, budget.held_out)
    evaluator = Evaluator(base, budget.batch_size)
    base_state = _state(base)
    models = [_state(family[s]) for s in skills]
    rows = []
    for reference in ("base", *skills):   # the individual rows: θ_pre and each expert alone
        path = results / "merge_table" / f"reference__{reference}.json"
        if not path.is_file():
            state = base_state if reference == "base" else models[skills.index(reference)]
            _write(path, {"experiment": "merge_table", "method": reference, "dare_rate": 0.0, "options": {},
                          "metrics": evaluator.score(state, validation | held_out)})
        rows.append(json.loads(path.read_text()))
    for method, settings in grid.items():
        for options in settings:
            for rate in dare_rates:
                label = "_".join(f"{k}{v}" for k, v in options.items()) or "default"
                path = results / "merge_table" / f"{method}__{label}__dare{rate}.json"
                if not path.is_file():
                    started = time.time()
                    merged = merge_state_dicts(method, base_state, models, MergeOptions(**options),
                                               dare=DareOptions(drop_rate=rate) if rate else None, seed=seed)
                    metrics = evaluator.score(merged, validation | held_out)
                    _write(path, {"experiment": "merge_table", "method": method, "options": options,
                                  "dare_rate": rate, "seed": seed, "metrics": metrics,
                                  "wall_seconds": round(time.time() - started, 2)})
                    log(f"merge_table {method} {options} dare={rate}: {metrics}")
                rows.append(json.loads(path.read_text()))
    selection = {}
    for row in rows:
        key = f"{row['method']}{' + DARE' if row.get('dare_rate') else ''}"
        score = sum(row["metrics"][f"{s}_validation"] for s in skills) / len(skills)
        if key not in selection or score < selection[key]["validation_mean_nll"]:
            selection[key] = {"validation_mean_nll": score, "options": row.get("options", {}),
                              "dare_rate": row.get("dare_rate", 0.0),
                              "held_out": {k: v for k, v in row["metrics"].items() if not k.endswith("_validation")}}
    _write(results / "merge_table" / "selection.json", {"selected_on": "validation (held-back train problems)",
                                                         "reported_on": sorted(held_out), "rows": selection})
    return selection
