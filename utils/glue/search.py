"""Grid search for merging GLUE task models (merge_plms_glue.py), on top of the merging library.

Protocol (the original MergeLM's): every setting of the method's grid is merged and each task of the
merged model is evaluated with its own head (the head of that task's fine-tuned model; heads are excluded
from the merge) on the selection split. The overall winner maximises the mean of the tasks' main scores;
the per-task winner of task t maximises t's main score, which is the original's per-(source, target)
selection. The first best setting wins (a later one must be strictly better). Winners are then scored on
the test split (GLUE dev). ``select_on="validation"`` (default) selects on the 10% held-out train split;
``select_on="test"`` selects on GLUE dev itself, as the original code does. A grid of one setting has
nothing to select: only its test split is evaluated (with validation selection, its record's
``selection_*`` fields are null).

``mask_merging`` (DARE + X) reads X's winning hyperparameters from X's result file for the same tasks
(as the original), and searches the drop rate on top of them. ``mask_search="per_task"`` (default, the
original's protocol): the winner for task t is the best drop rate on top of X's winning setting for t
(and the ``mean`` winner the best rate on top of X's ``mean`` winner), so each task gets X's best setting ×
the rate grid, as in the paper. ``mask_search="wide"`` (an extension, named in the result file): every
criterion selects among all of X's distinct winning settings (each task's and the mean's) × the rate grid,
a larger search than the paper's that can inflate DARE's gains. DARE is applied to each model first (seeded
per model and tensor by the library) and Fisher / RegMean statistics are then collected on the DARE'd
models, as in the original. The statistics' examples depend only on the seed and the count: each
statistic reads a fresh train loader shuffled by the seed (the original reset the order before each
merge), so a winning setting re-run alone (``--merge_grid none``) reproduces its grid result bit for bit.

Outputs, under the save folder:
  save_merge_results/<tasks>/<method>[/<apply_method>]/<lm><suffix>.json        winners + all settings
  save_merge_results/<tasks>/<method>[/<apply_method>]/<lm><suffix>_settings/<setting>.json
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model_merging_methods import DareOptions, MergeError, MergeOptions, check_inputs, dare_state_dict, is_excluded, merge_state_dicts
from model_merging_methods.registry import get_method
from utils.cli import dare_suffix, set_random_seed
from utils.glue.cli import BASE_METHODS, MASK_SEARCHES, MERGING_METHODS  # noqa: F401 (re-exported)
from utils.glue.checkpoints import load_classifier, model_short_name, task_checkpoint
from utils.glue.data import load_task_splits, task_info
from utils.glue.metrics import main_score
from utils.glue.statistics import diagonal_fisher, regmean_gram_matrices, regmean_plusplus_merge
from utils.glue.training import encode_split, evaluate_task, make_loader
from utils import progress
from utils.records import library_versions, write_json_atomic
from utils.recipes.architecture import block_layers

STATISTICS_AXIS = {"fisher_merging": "nums_fisher_examples", "regmean_merging": "nums_regmean_examples",
                   "regmean_plusplus": "nums_regmean_examples"}
DEFAULT_MERGE_SEED = 0   # configs/glue.yaml merging.seed; another seed is named in mask_merging's result files


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


@dataclass(frozen=True)
class MethodOptions:
    """Method options the grids do not set (from the flags / the config's merging defaults)."""

    ties_trim: str = "global"
    ties_normalize: str = "count"
    normalize_fisher_weight: bool = False
    minimal_fisher_weight: float = 1e-6


@dataclass(frozen=True)
class FlagSetting:
    """The hyperparameter flags: the single setting searched with ``--merge_grid none``."""

    scaling_coefficient: float = 1.0
    param_value_mask_rate: float = 0.8
    nums_fisher_examples: tuple[int, ...] | None = None
    fisher_scaling_coefficients: tuple[float, ...] | None = None
    nums_regmean_examples: tuple[int, ...] | None = None
    reduce_non_diagonal_ratio: float = 1.0
    norm_mode: str = "exp"
    norm_alpha: float = 1.5
    norm_beta: float = 1.0


@dataclass(frozen=True)
class SearchOptions:
    """What MergeSearch needs besides the models: the DARE variant (its rate is set per setting), the
    method options, the seed reset before every merge, and progress bars."""

    dare: DareOptions
    methods: MethodOptions
    seed: int
    progress: bool = False


def merge_options(method: str, setting: dict, num_models: int, methods: MethodOptions) -> MergeOptions:
    """MergeOptions of one base-method setting (grid values take precedence over the flags)."""
    if method == "task_arithmetic":
        return MergeOptions(scaling_coefficient=float(setting["scaling_coefficient"]))
    if method == "ties_merging":
        return MergeOptions(
            scaling_coefficient=float(setting["scaling_coefficient"]),
            density=1.0 - float(setting["param_value_mask_rate"]),
            ties_trim=methods.ties_trim,
            ties_normalize=methods.ties_normalize,
        )
    if method == "fisher_merging":
        coefficients = setting.get("fisher_scaling_coefficients")
        if coefficients is None and "fisher_scaling_coefficient" in setting:
            coefficients = [float(setting["fisher_scaling_coefficient"])] * num_models
        return MergeOptions(
            fisher_coefficients=coefficients,
            fisher_normalize=bool(methods.normalize_fisher_weight),
            fisher_eps=float(methods.minimal_fisher_weight),
        )
    if method in ("regmean_merging", "regmean_plusplus"):
        return MergeOptions(regmean_alpha=float(setting["reduce_non_diagonal_ratio"]))
    if method == "norm_adaptive":  # the norms: ‖δ_k‖₂ over the merged (non-head) tensors, computed by the library
        return MergeOptions(scaling_coefficient=float(setting["scaling_coefficient"]), norm_mode=str(setting["norm_mode"]),
                            norm_alpha=float(setting.get("norm_alpha", 1.5)), norm_beta=float(setting.get("norm_beta", 1.0)))
    if method in BASE_METHODS or is_parameter_method(method):
        return MergeOptions()
    return generic_merge_options(method, setting)


def is_parameter_method(method: str) -> bool:
    """A registry method that takes recipe-style ``parameters`` (mergekit's methods) instead of MergeOptions."""
    from model_merging_methods import get_method

    return getattr(get_method(method), "kind", "state_dict") == "group"


def merge_parameters(method: str, setting: dict) -> dict | None:
    """The ``parameters`` of a parameter method (its grid's keys are its parameter names), else None."""
    return dict(setting) if is_parameter_method(method) else None


def generic_merge_options(method: str, setting: dict) -> MergeOptions:
    """Any other registry method: the grid's keys are MergeOptions fields, passed as they are (lists become
    tuples); a key that is not a field is an error naming it."""
    fields = {f.name for f in dataclasses.fields(MergeOptions)}
    unknown = sorted(set(setting) - fields)
    if unknown:
        raise ValueError(f"{method}: grid key(s) {unknown} are not merge options; known: {', '.join(sorted(fields))}")
    options = MergeOptions(**{key: tuple(value) if isinstance(value, list) else value for key, value in setting.items()})
    options.validate()
    return options


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
    """One fine-tuned task model taking part in a merge, with its data loaders. ``statistics_loader``
    makes a fresh train loader whose order comes from the merge seed alone, so the examples a Fisher /
    RegMean statistic sees depend only on (seed, count), never on the settings merged before it."""

    task: str
    row: dict
    model: torch.nn.Module
    state: dict
    statistics_loader: Callable[[], object] | None = None
    eval_loaders: dict = field(default_factory=dict)


class MergeSearch:
    """Merges one group of task models for every setting and evaluates each task with its own head."""

    def __init__(self, members: list[TaskMember], base_state: dict, exclude_regex, device, options: SearchOptions):
        self.members, self.exclude_regex = members, list(exclude_regex)
        # Heads are excluded from the merge (they may differ in shape between tasks: STS-B has one
        # output); the library copies them from the base, and evaluation puts each task's own back.
        self.base_state = base_state
        self.states = [member.state for member in members]
        self.device, self.options = device, options
        self._statistics_cache: dict = {}
        self._statistics_seconds: dict = {}
        self.last_timing: dict[str, float] = {}

    def dare_options(self, rate: float) -> DareOptions:
        return dataclasses.replace(self.options.dare, drop_rate=rate)

    def model_states(self, rate: float) -> list[dict]:
        """Each member's state, DARE'd at ``rate`` (seeded per model index, heads untouched) when rate > 0."""
        if rate == 0.0:
            return self.states
        return [dare_state_dict(state, self.base_state, self.dare_options(rate), seed=self.options.seed, model_index=k,
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
                started = time.perf_counter()
                set_random_seed(self.options.seed)
                member.model.load_state_dict(self.with_own_head(member, state))
                collect = diagonal_fisher if method == "fisher_merging" else regmean_gram_matrices
                self._statistics_cache[key] = collect(
                    member.model, member.statistics_loader(), count, self.device, exclude_regex=self.exclude_regex, progress=self.options.progress
                )
                member.model.load_state_dict(member.state)
                self._statistics_seconds[key] = time.perf_counter() - started
            result.append(self._statistics_cache[key])
        self.last_timing["statistics_time_s"] = sum(self._statistics_seconds[(method, k, count, rate)] for k, count in enumerate(counts))
        return result

    def merge(self, method: str, setting: dict, rate: float) -> dict:
        """The merged state dict of one setting (base method ``method``, DARE rate ``rate``). ``last_timing``
        then holds its wall times: ``dare_time_s`` (DARE on every model), ``statistics_time_s`` (Fisher /
        RegMean statistics: the time they took when first collected, even if cached since) and
        ``merge_time_s`` (the merge function itself)."""
        started = time.perf_counter()
        self.last_timing = {"statistics_time_s": 0.0}
        set_random_seed(self.options.seed)
        states = self.model_states(rate)
        self.last_timing["dare_time_s"] = time.perf_counter() - started
        counts = None
        if method in STATISTICS_AXIS:
            counts = per_model_examples(setting[STATISTICS_AXIS[method]], len(self.members), STATISTICS_AXIS[method])
        options = merge_options(method, setting, len(self.members), self.options.methods)
        started = time.perf_counter()
        if method == "regmean_plusplus":   # statistics and merge interleave, block by block (its time is the merge's)
            merged = regmean_plusplus_merge([m.model for m in self.members], [self.with_own_head(m, s) for m, s in zip(self.members, states)],
                                            self.base_state, [m.statistics_loader for m in self.members], counts, options.regmean_alpha,
                                            self.device, exclude_regex=self.exclude_regex, progress=self.options.progress)
            for member in self.members:
                member.model.load_state_dict(member.state)
            self.last_timing["merge_time_s"] = time.perf_counter() - started
            return merged
        statistics = self.statistics(method, counts, rate, states) if counts else None
        started = time.perf_counter()
        parameters = merge_parameters(method, setting)
        extra = {"parameters": parameters} if parameters is not None else {}
        if get_method(method).layer_aware:   # LiNeS: each tensor's block index, as the recipe planner finds it
            config = self.members[0].model.config.to_dict()
            extra["layers"] = block_layers(config, list(self.base_state), "the encoder")
        merged = merge_state_dicts(method, self.base_state, states, options, seed=self.options.seed, statistics=statistics,
                                   exclude_regex=self.exclude_regex, **extra)
        self.last_timing["merge_time_s"] = time.perf_counter() - started
        return merged

    def evaluate(self, merged: dict, split: str) -> dict[str, dict]:
        """Each task's metrics on ``split`` with the merged encoder and the task's own head."""
        results = {}
        for member in self.members:
            member.model.load_state_dict(self.with_own_head(member, merged))
            results[member.task] = evaluate_task(
                member.model, member.eval_loaders[split], member.row, self.device, progress=self.options.progress, description=f"{split} {member.task}"
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


def select_winners(records: list[dict], criteria: list[str], candidates: dict[str, dict] | None = None) -> dict[str, int]:
    """Index of the best record per criterion (first best wins: later ones must be strictly better).

    ``candidates[criterion]``, when given, is the only base setting that criterion may select from
    (mask_merging's per-task protocol); otherwise every record competes."""
    winners = {}
    for criterion in criteria:
        best = None
        for index, record in enumerate(records):
            if candidates is not None and record["setting"] != candidates[criterion]:
                continue
            if best is None or record["selection_scores"][criterion] > records[best]["selection_scores"][criterion]:
                best = index
        winners[criterion] = best
    return winners


def read_apply_method_winners(path: Path, apply_method: str) -> dict[str, dict]:
    """The winning setting per criterion (``mean`` and each task) of the base method's result JSON."""
    if not path.is_file():
        raise FileNotFoundError(
            f"mask_merging with {apply_method} needs {apply_method}'s result file {path}; run merge_plms_glue.py "
            f"--merging_method_name {apply_method} for the same tasks first, or pass --merge_grid none"
        )
    with open(path, encoding="utf-8") as handle:
        payload = json.load(handle)
    return {criterion: winner["setting"] for criterion, winner in payload["winners"].items()}




@dataclass(frozen=True)
class MergeRunOptions:
    """One merge_plms_glue.py run: the groups of tasks, the method, its grid and the selection protocol.
    ``dare`` carries the DARE flags (its rate is the single rate of ``grid="none"``); ``flags`` is the
    command line, recorded in every result."""

    language_model_name: str
    groups: tuple[tuple[str, ...], ...]
    method: str
    apply_method: str
    grid: str
    select_on: str
    dare: DareOptions
    flag_setting: FlagSetting
    methods: MethodOptions
    seed: int
    learning_rate: float | None
    batch_size: int
    max_seq_length: int
    max_train_samples: int | None
    max_eval_samples: int | None
    glue_dir: str | None
    save_dir: str
    allow_pickle: bool
    progress: bool
    flags: dict
    mask_search: str = "per_task"
    max_validation_samples: int | None = None   # cap of the validation split only (default: max_eval_samples)
    eval_batch_size: int | None = None          # evaluation batch size (default: batch_size, which statistics use)
    seeds: tuple[int, ...] | None = None        # run the search once per seed (data loaded once); None: ``seed``
    winners: str = "all"                        # "all": the mean's and each task's winner; "mean": only the mean's
    batch_methods: tuple[str, ...] | None = None  # several methods (apply methods for mask_merging), data loaded once

    def per_method(self) -> list["MergeRunOptions"]:
        """One run per method of ``batch_methods``, each what its own command line would be (flags included)."""
        if not self.batch_methods:
            return [self]
        attribute, flag, batch_flag = (("apply_method", "mask_apply_method", "mask_apply_methods") if self.method == "mask_merging"
                                   else ("method", "merging_method_name", "merging_method_names"))
        return [dataclasses.replace(self, **{attribute: name}, batch_methods=None, flags={**self.flags, flag: name, batch_flag: None})
                for name in self.batch_methods]

    def criteria(self, tasks) -> list[str]:
        """The selection criteria: ``mean`` (one merged model for every task), then each task's own."""
        return ["mean"] if self.winners == "mean" else ["mean", *tasks]

    @property
    def base_method(self) -> str:
        """The method merging the (DARE'd, for mask_merging) models."""
        return self.apply_method if self.method == "mask_merging" else self.method


def cli_setting(method: str, flags: FlagSetting) -> dict:
    """The single setting of ``--merge_grid none``, from the flags."""
    if method == "task_arithmetic":
        return {"scaling_coefficient": flags.scaling_coefficient}
    if method == "ties_merging":
        return {"scaling_coefficient": flags.scaling_coefficient, "param_value_mask_rate": flags.param_value_mask_rate}
    if method == "fisher_merging":
        if flags.nums_fisher_examples is None:
            raise ValueError("fisher_merging with --merge_grid none needs --nums_fisher_examples")
        setting = {"nums_fisher_examples": list(flags.nums_fisher_examples)}
        if flags.fisher_scaling_coefficients is not None:
            setting["fisher_scaling_coefficients"] = list(flags.fisher_scaling_coefficients)
        return setting
    if method in ("regmean_merging", "regmean_plusplus"):
        if flags.nums_regmean_examples is None:
            raise ValueError(f"{method} with --merge_grid none needs --nums_regmean_examples")
        return {"nums_regmean_examples": list(flags.nums_regmean_examples), "reduce_non_diagonal_ratio": flags.reduce_non_diagonal_ratio}
    if method == "norm_adaptive":
        return {"scaling_coefficient": flags.scaling_coefficient, "norm_mode": flags.norm_mode,
                "norm_alpha": flags.norm_alpha, "norm_beta": flags.norm_beta}
    return {}


def result_suffix(options: MergeRunOptions, for_apply_method: bool = False) -> str:
    """File-name suffix for settings that differ from the paper's defaults (grid, selection split, and for
    mask_merging the DARE variant)."""
    suffix = "" if options.grid == "paper" else f"_grid_{options.grid}"
    suffix += "" if options.select_on == "validation" else f"_select_on_{options.select_on}"
    if options.method == "mask_merging" and not for_apply_method:
        suffix += dare_suffix(options.dare, searched_rate=True)
        suffix += "" if options.mask_search == "per_task" or options.grid == "none" else f"_search_{options.mask_search}"
        # the DARE masks' seed (the apply method's file, read for its winners, is seed-independent)
        suffix += "" if options.seed == DEFAULT_MERGE_SEED else f"_seed_{options.seed}"
    return suffix


def result_dir(options: MergeRunOptions, tasks, method: str, apply_method: str | None) -> Path:
    folder = Path(options.save_dir) / "save_merge_results" / "_".join(tasks) / method
    return folder / apply_method if apply_method else folder


def _grid(config: dict, name: str) -> dict:
    if name not in config["merge_grids"]:
        raise ValueError(f"unknown merge grid '{name}'; known: {', '.join(config['merge_grids'])}, none")
    return config["merge_grids"][name]


def grid_settings(options: MergeRunOptions, config: dict, tasks) -> tuple[str, list[tuple[dict, float]], dict[str, dict] | None]:
    """(base method, [(base setting, DARE rate)] to search, the base setting each criterion selects from
    (None: all compete)); validates rates and grids."""
    method = options.method
    if method == "mask_merging":
        apply = options.apply_method
        if options.mask_search not in MASK_SEARCHES:
            raise ValueError(f"unknown mask_merging search '{options.mask_search}'; known: {', '.join(MASK_SEARCHES)}")
        if options.grid == "none":
            return apply, [(cli_setting(apply, options.flag_setting), options.dare.drop_rate)], None
        grid = _grid(config, options.grid)
        rates = expand_grid(grid["mask_merging"], f"merge grid '{options.grid}' mask_merging")
        rates = [check_drop_rate(r["weight_mask_rate"], "mask_merging weight_mask_rate") for r in rates]
        short = model_short_name(options.language_model_name)
        apply_file = result_dir(options, tasks, apply, None) / f"{short}{result_suffix(options, for_apply_method=True)}.json"
        base_winners = read_apply_method_winners(apply_file, apply)
        missing = [criterion for criterion in options.criteria(tasks) if criterion not in base_winners]
        if missing:
            raise ValueError(f"{apply_file} has no winner for {', '.join(missing)}")
        base_settings = []
        base_winners = {criterion: base_winners[criterion] for criterion in options.criteria(tasks)}
        for setting in base_winners.values():
            if setting not in base_settings:
                base_settings.append(setting)
        candidates = base_winners if options.mask_search == "per_task" else None
        return apply, [(setting, rate) for setting in base_settings for rate in rates], candidates
    if options.grid == "none":
        return method, [(cli_setting(method, options.flag_setting), 0.0)], None
    grid = _grid(config, options.grid)
    if method not in grid:
        raise ValueError(f"merge grid '{options.grid}' has no entry for {method}")
    axes = grid[method]
    settings = expand_grid(axes, f"merge grid '{options.grid}' {method}") if axes else [{}]
    return method, [(setting, 0.0) for setting in settings], None


def load_member(task: str, row: dict, checkpoint: Path, data: dict, options: MergeRunOptions, needs_train: bool) -> TaskMember:
    """A task's fine-tuned model with its loaders (selection and test splits; train for statistics)."""
    from transformers import AutoTokenizer

    model = load_classifier(checkpoint, allow_pickle=options.allow_pickle)
    if model.config.num_labels != row["num_labels"]:
        raise ValueError(f"checkpoint {checkpoint} has a head with {model.config.num_labels} labels but task '{task}' needs {row['num_labels']}")
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    member = TaskMember(task=task, row=row, model=model, state={k: v.detach().clone() for k, v in model.state_dict().items()})
    for split in {options.select_on, "test"}:
        member.eval_loaders[split] = make_loader(encode_split(tokenizer, data[split], row, options.max_seq_length), tokenizer,
                                                 options.eval_batch_size or options.batch_size, shuffle=False)
    if needs_train:
        encoded = encode_split(tokenizer, data["train"], row, options.max_seq_length)
        member.statistics_loader = functools.partial(make_loader, encoded, tokenizer, options.batch_size, shuffle=True, seed=options.seed)
    return member


def run_group(options: MergeRunOptions, config: dict, tasks: list[str], data: dict, checkpoints: dict, device) -> dict:
    """Search one group's grid; write the per-setting and winner JSONs; return the winner payload."""
    started = time.time()
    short = model_short_name(options.language_model_name)
    exclude = config["exclude_param_names_regex"]
    method, settings, candidates = grid_settings(options, config, tasks)
    needs_train = method in STATISTICS_AXIS
    members = [load_member(task, task_info(config, task), checkpoints[task], data[task], options, needs_train) for task in tasks]
    base_model = load_classifier(options.language_model_name, allow_pickle=options.allow_pickle, num_labels=members[0].row["num_labels"])
    base_state = base_model.state_dict()
    for member in members:
        if member.model.config.model_type != base_model.config.model_type:
            raise ValueError(
                f"different architectures: checkpoint {checkpoints[member.task]} is '{member.model.config.model_type}' "
                f"but {options.language_model_name} is '{base_model.config.model_type}'"
            )
        check_same_architecture(base_state, member.state, options.language_model_name, str(checkpoints[member.task]), exclude)
    search = MergeSearch(members, base_state, exclude, device, SearchOptions(options.dare, options.methods, options.seed, options.progress))
    records = []
    for number, (setting, rate) in enumerate(settings):
        progress.phase(number, len(settings), f"{method} setting {number + 1}")
        full_setting = {**setting, **({"weight_mask_rate": rate} if options.method == "mask_merging" else {})}
        merged = search.merge(method, setting, rate)
        timing = dict(search.last_timing)
        record = {"name": setting_name(full_setting), "setting": setting, "weight_mask_rate": rate, "timing": timing}
        if len(settings) == 1 and options.select_on != "test":
            # one setting: nothing to select, so the selection split is not evaluated (the test split is)
            record.update(selection_split=None, selection_metrics=None, selection_scores=None)
            test = search.evaluate(merged, "test")
            record["test_metrics"], record["test_scores"] = test, scores_of(members, test)
            records.append(record)
            break
        started_evaluation = time.perf_counter()
        metrics = search.evaluate(merged, options.select_on)
        timing["selection_evaluation_time_s"] = time.perf_counter() - started_evaluation
        record.update(selection_split=options.select_on, selection_metrics=metrics, selection_scores=scores_of(members, metrics))
        records.append(record)
        print(f"{'_'.join(tasks)} {options.method} {record['name']}: " + ", ".join(f"{k} {v:.4f}" for k, v in record["selection_scores"].items()))
    winners = {}
    chosen = select_winners(records, options.criteria(tasks), candidates) if len(records) > 1 else dict.fromkeys(options.criteria(tasks), 0)
    for criterion, index in chosen.items():
        record = records[index]
        if "test_metrics" not in record:
            test = record["selection_metrics"] if options.select_on == "test" else search.evaluate(search.merge(method, record["setting"], record["weight_mask_rate"]), "test")
            record["test_metrics"], record["test_scores"] = test, scores_of(members, test)
        winners[criterion] = {"criterion": criterion, **record}
    apply_method = options.apply_method if options.method == "mask_merging" else None
    folder = result_dir(options, tasks, options.method, apply_method)
    stem = f"{short}{result_suffix(options)}"
    payload = {
        "script": "merge_plms_glue.py",
        "config": {**options.flags, "tasks": tasks, "base_method": method, "exclude_param_names_regex": exclude,
                   "checkpoints": {t: str(p) for t, p in checkpoints.items()}},
        "seeds": {"merge_seed": options.seed, "split_seed": config["splits"]["split_seed"]},
        "versions": library_versions(),
        "num_examples": {task: {split: len(split_data) for split, split_data in data[task].items()} for task in tasks},
        "winners": winners,
        "settings": records,
        "wall_time_s": time.time() - started,
    }
    for record in records:
        write_json_atomic(folder / f"{stem}_settings" / f"{record['name']}.json", {"config": payload["config"], "versions": payload["versions"], **record})
    path = write_json_atomic(folder / f"{stem}.json", payload)
    best = winners["mean"]
    chosen_on = "the only setting" if best["selection_scores"] is None else f"{options.select_on} mean {best['selection_scores']['mean']:.4f}"
    print(f"winner {best['name']} ({chosen_on}); test "
          + ", ".join(f"{k} {v:.4f}" for k, v in best["test_scores"].items()) + f" -> {path}")
    return payload


def run_merge_search(options: MergeRunOptions, config: dict, device) -> list[dict]:
    """Check every method's grid for every group and every checkpoint before any merge, load the data once,
    search each group (once per seed of ``options.seeds``, for each method of ``options.batch_methods``)."""
    runs = options.per_method()
    for run in runs:
        for group in run.groups:
            grid_settings(run, config, group)
    tasks = list(dict.fromkeys(task for group in options.groups for task in group))
    needs_train = any(run.base_method in STATISTICS_AXIS for run in runs)
    splits = tuple({options.select_on, "test"} | ({"train"} if needs_train else set()))
    data, checkpoints = {}, {}
    for task in tasks:
        data[task] = load_task_splits(task, config, options.glue_dir, splits=splits, max_train_samples=options.max_train_samples,
                                      max_eval_samples=options.max_eval_samples, max_validation_samples=options.max_validation_samples)
        checkpoints[task] = task_checkpoint(options.save_dir, config, options.language_model_name, task, options.learning_rate)
    results = []
    for run in runs:
        for seed in run.seeds or (run.seed,):
            seeded = dataclasses.replace(run, seed=seed, seeds=None, flags={**run.flags, "seed": seed, "seeds": None})
            results += [run_group(seeded, config, list(group), data, checkpoints, device) for group in run.groups]
    return results
