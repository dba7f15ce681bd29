"""Grid search for merging GLUE task models (docs/mergelm-spec.md §3.7), on top of the merging library.

Protocol: every setting of the method's grid is merged and each task of the merged model is evaluated
with its own head (the head of that task's fine-tuned model; heads are excluded from the merge) on the
selection split. The overall winner maximises the mean of the tasks' main scores; the per-task winner of
task t maximises t's main score, which is the original's per-(source, target) selection. The first best
setting wins (a later one must be strictly better). Winners are then scored on the test split (GLUE dev).
``select_on="validation"`` (default) selects on the 10% held-out train split; ``select_on="test"``
selects on GLUE dev itself, as the original code does.

``mask_merging`` (DARE + X) reads X's winning hyperparameters from X's result file for the same tasks
(as the original), and searches the drop rate on top of them. DARE is applied to each model first (seeded
per model and tensor by the library) and Fisher / RegMean statistics are then collected on the DARE'd
models, as in the original.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model_merging_methods import (DareOptions, MergeError, MergeOptions, check_inputs, dare_state_dict, is_excluded,
                                   merge_state_dicts)
from utils.glue.checkpoints import set_random_seed
from utils.glue.metrics import main_score
from utils.glue.training import evaluate_task
from utils.glue.statistics import diagonal_fisher, regmean_gram_matrices

BASE_METHODS = ("average_merging", "task_arithmetic", "fisher_merging", "regmean_merging", "ties_merging")
MERGING_METHODS = (*BASE_METHODS, "mask_merging")
STATISTICS_AXIS = {"fisher_merging": "nums_fisher_examples", "regmean_merging": "nums_regmean_examples"}


def expand_grid(axes: dict[str, list], where: str) -> list[dict]:
    """All combinations of the grid axes (key order kept); an empty axis is an error."""
    for name, values in axes.items():
        if not isinstance(values, (list, tuple)) or len(values) == 0:
            raise ValueError(f"empty grid: axis '{name}' of {where} has no values")
    names = list(axes)
    return [dict(zip(names, combination)) for combination in itertools.product(*(axes[n] for n in names))]


def check_drop_rate(rate: float, where: str) -> float:
    """A DARE drop rate must lie in [0, 1)."""
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"drop rate {rate} ({where}) is outside [0, 1)")
    return float(rate)


def setting_name(setting: dict) -> str:
    """File-name form of a setting: ``key_value`` pairs joined by ``_`` (lists joined by ``_``)."""
    if not setting:
        return "default"
    parts = []
    for key, value in setting.items():
        shown = "_".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        parts.append(f"{key}_{shown}")
    return "_".join(parts)


def merge_options(method: str, setting: dict, num_models: int, args) -> MergeOptions:
    """MergeOptions of one base-method setting (grid values take precedence over the CLI flags)."""
    if method == "task_arithmetic":
        return MergeOptions(scaling_coefficient=float(setting["scaling_coefficient"]))
    if method == "ties_merging":
        return MergeOptions(
            scaling_coefficient=float(setting["scaling_coefficient"]),
            density=1.0 - float(setting["param_value_mask_rate"]),
            ties_trim=args.ties_trim,
            ties_normalize=args.ties_normalize,
        )
    if method == "fisher_merging":
        coefficients = setting.get("fisher_scaling_coefficients")
        if coefficients is None and "fisher_scaling_coefficient" in setting:
            coefficients = [float(setting["fisher_scaling_coefficient"])] * num_models
        return MergeOptions(
            fisher_coefficients=coefficients,
            fisher_normalize=bool(args.normalize_fisher_weight),
            fisher_eps=float(args.minimal_fisher_weight),
        )
    if method == "regmean_merging":
        return MergeOptions(regmean_alpha=float(setting["reduce_non_diagonal_ratio"]))
    return MergeOptions()


def per_model_examples(value, num_models: int, what: str) -> list[int]:
    """Broadcast one example count (a number or a one-element list) to every model, or check a per-model list."""
    values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
    values = values * num_models if len(values) == 1 else values
    if len(values) != num_models:
        raise ValueError(f"{what}: {len(values)} values for {num_models} models")
    for v in values:
        if v <= 0:
            raise ValueError(f"{what}: example counts must be positive, got {v}")
    return values


@dataclass
class TaskMember:
    """One fine-tuned task model taking part in a merge, with its data loaders."""

    task: str
    row: dict
    model: torch.nn.Module
    state: dict
    train_loader: object = None
    eval_loaders: dict = field(default_factory=dict)


class MergeSearch:
    """Merges one group of task models for every setting and evaluates each task with its own head."""

    def __init__(self, members: list[TaskMember], base_state: dict, exclude_regex, device, args):
        self.members, self.exclude_regex = members, list(exclude_regex)
        # Heads are excluded from the merge (they may differ in shape between tasks: STS-B has one
        # output); the library copies them from the base, and evaluation puts each task's own back.
        self.base_state = base_state
        self.states = [member.state for member in members]
        self.device, self.args = device, args
        self._statistics_cache: dict = {}

    def dare_options(self, rate: float) -> DareOptions:
        return DareOptions(
            drop_rate=rate,
            rescale=bool(self.args.use_weight_rescale),
            strategy=self.args.mask_strategy,
            weight_format=self.args.weight_format,
        )

    def model_states(self, rate: float) -> list[dict]:
        """Each member's state, DARE'd at ``rate`` (seeded per model index, heads untouched) when rate > 0."""
        if rate == 0.0:
            return self.states
        return [dare_state_dict(state, self.base_state, self.dare_options(rate), seed=self.args.seed, model_index=k,
                                exclude_regex=self.exclude_regex) for k, state in enumerate(self.states)]

    def with_own_head(self, member: TaskMember, state: dict) -> dict:
        """``state`` with the member's own (excluded) head tensors."""
        return {**state, **{name: tensor for name, tensor in member.state.items() if is_excluded(name, self.exclude_regex)}}

    def statistics(self, method: str, counts: list[int], rate: float, states: list[dict]) -> list[dict] | None:
        """Fisher or RegMean statistics of every member (with DARE'd weights when rate > 0), cached."""
        if method not in STATISTICS_AXIS:
            return None
        result = []
        for k, (member, state, count) in enumerate(zip(self.members, states, counts)):
            key = (method, k, count, rate)
            if key not in self._statistics_cache:
                set_random_seed(self.args.seed)
                member.model.load_state_dict(self.with_own_head(member, state))
                collect = diagonal_fisher if method == "fisher_merging" else regmean_gram_matrices
                self._statistics_cache[key] = collect(
                    member.model, member.train_loader, count, self.device, exclude_regex=self.exclude_regex, progress=self.args.progress
                )
                member.model.load_state_dict(member.state)
            result.append(self._statistics_cache[key])
        return result

    def merge(self, method: str, setting: dict, rate: float) -> dict:
        """The merged state dict of one setting (base method ``method``, DARE rate ``rate``)."""
        set_random_seed(self.args.seed)
        states = self.model_states(rate)
        counts = None
        if method in STATISTICS_AXIS:
            counts = per_model_examples(setting[STATISTICS_AXIS[method]], len(self.members), STATISTICS_AXIS[method])
        statistics = self.statistics(method, counts, rate, states) if counts else None
        options = merge_options(method, setting, len(self.members), self.args)
        return merge_state_dicts(method, self.base_state, states, options, seed=self.args.seed, statistics=statistics,
                                 exclude_regex=self.exclude_regex)

    def evaluate(self, merged: dict, split: str) -> dict[str, dict]:
        """Each task's metrics on ``split`` with the merged encoder and the task's own head."""
        results = {}
        for member in self.members:
            member.model.load_state_dict(self.with_own_head(member, merged))
            results[member.task] = evaluate_task(
                member.model, member.eval_loaders[split], member.row, self.device, progress=self.args.progress, description=f"{split} {member.task}"
            )
            member.model.load_state_dict(member.state)
        return results


def check_same_architecture(reference: dict, state: dict, reference_label: str, label: str, exclude_regex) -> None:
    """Same tensor names, and shapes outside the heads, else ValueError naming the checkpoints and tensor."""
    try:
        check_inputs(reference, [state], exclude_regex)
    except MergeError as error:
        raise ValueError(f"different architectures: {reference_label} (base) vs {label} (model 0): {error}") from error


def scores_of(members: list[TaskMember], results: dict[str, dict]) -> dict[str, float]:
    """Main score per task plus ``mean`` over the tasks."""
    scores = {member.task: main_score(member.row, results[member.task]) for member in members}
    scores["mean"] = float(np.mean([scores[member.task] for member in members]))
    return scores


def select_winners(records: list[dict], criteria: list[str]) -> dict[str, int]:
    """Index of the best record per criterion (first best wins: later ones must be strictly better)."""
    winners = {}
    for criterion in criteria:
        best = None
        for index, record in enumerate(records):
            if best is None or record["selection_scores"][criterion] > records[best]["selection_scores"][criterion]:
                best = index
        winners[criterion] = best
    return winners


def read_apply_method_winners(path: Path, apply_method: str) -> list[dict]:
    """Distinct winning settings (overall and per task) of the base method's result JSON."""
    if not path.is_file():
        raise FileNotFoundError(
            f"mask_merging with {apply_method} needs {apply_method}'s result file {path}; run merge_plms_glue.py "
            f"--merging_method_name {apply_method} for the same tasks first, or pass --merge_grid none"
        )
    with open(path, encoding="utf-8") as handle:
        payload = json.load(handle)
    settings = []
    for winner in payload["winners"].values():
        if winner["setting"] not in settings:
            settings.append(winner["setting"])
    return settings
