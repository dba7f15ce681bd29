"""Sweep declarations (``configs/sweeps/*.yml``), validated with pydantic, and their expansion into settings.

A sweep names an entry script (a file at the repository root with ``main(argv)`` and ``build_parser``),
its fixed flags, and axes to cross:

    name: minilm_mrpc_drop
    script: inference_plms_glue.py
    fixed: {dataset_names: [mrpc], save_dir: runs/glue, no_progress: true}
    axes:
      weight_mask_rate: [0.0, 0.1, 0.5, 0.9]            # a list of values
      max_eval_samples: {start: 100, stop: 400, step: 100}   # a range (stop excluded, as Python's range)
      variant:                                          # a zipped axis: flags that move together
        labels: [DARE, DropOnly]
        zip: {use_weight_rescale: [true, false], mask_strategy: [random, random]}
    seeds: [0, 1, 2]                                    # crossed last, passed as --<seed_flag>
    exclude: [{weight_mask_rate: 0.0, variant: DropOnly}]   # drop settings matching every key
    batch: {weight_mask_rate: weight_mask_rates, seed: seeds}   # optional, see below

Settings = the Cartesian product of the axes (in file order, then the seeds), minus the excluded ones.
Flag values: ``true`` = a switch (``--flag``), ``false``/``null`` = the flag left out, a list = several
values after one flag (``nargs``), anything else = ``--flag value``. Each setting's id is the first 12 hex
digits of sha256 over the script name and its canonical flags (sorted keys, JSON), so it does not depend
on the order of the axes or on where the sweep runs. Its folder is ``<output_root>/<output>`` where
``output`` is a template formatted with the flags and ``id`` (default ``{id}``); with ``output_flag`` the
script gets ``<folder>/output`` as that flag (a folder it creates, and may replace with --overwrite, while the
setting's record, log and lock stay beside it).

``batch`` maps an axis flag to a list flag of the script that runs several of its values in one process
(inference_plms_glue.py loads the fine-tuned and base weights once and applies each mask from them).
Settings that differ only in batched axes are run as one call; every setting keeps its own id and record.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FLAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
OUTPUT_SUBFOLDER = "output"   # with output_flag: the script's folder inside the setting's folder
Scalar = Union[bool, int, float, str, None]
FlagValue = Union[Scalar, list[Scalar]]


class SweepError(ValueError):
    """A sweep declaration or a setting that cannot be run as declared (message names file and key)."""


class RangeAxis(BaseModel):
    """``{start, stop, step}``: start, start + step, ... below stop (floats rounded to 10 digits)."""

    model_config = ConfigDict(extra="forbid")
    start: float
    stop: float
    step: float = 1.0

    @field_validator("step")
    @classmethod
    def _nonzero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("step must not be 0")
        return value

    def values(self) -> list:
        count = max(0, math.ceil(round((self.stop - self.start) / self.step, 10)))
        integral = all(float(v).is_integer() for v in (self.start, self.stop, self.step))
        points = [round(self.start + i * self.step, 10) for i in range(count)]
        return [int(p) for p in points] if integral else points


class ZipAxis(BaseModel):
    """Flags that move together: ``zip: {flag: [v1, v2], other: [w1, w2]}`` gives points (v1, w1), (v2, w2)."""

    model_config = ConfigDict(extra="forbid")
    zip: dict[str, list[FlagValue]]
    labels: list[str] | None = None

    @model_validator(mode="after")
    def _lengths(self) -> "ZipAxis":
        lengths = {name: len(values) for name, values in self.zip.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"zipped lists differ in length: {lengths}")
        if self.labels is not None and len(self.labels) != self.length():
            raise ValueError(f"{len(self.labels)} labels for {self.length()} zipped points")
        return self

    def length(self) -> int:
        return len(next(iter(self.zip.values()))) if self.zip else 0


class SlurmSettings(BaseModel):
    """submitit's SLURM parameters (flags of scripts/sweep.py override them)."""

    model_config = ConfigDict(extra="forbid")
    partition: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 4
    mem_gb: float | None = None
    timeout_min: int = 240
    array_parallelism: int = 64
    additional_parameters: dict[str, Any] = Field(default_factory=dict)


class RaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0


class LocalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: int | None = None


class SweepSpec(BaseModel):
    """One sweep declaration; see the module docstring."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    script: str
    output_root: str
    output: str = "{id}"
    output_flag: str | None = None
    fixed: dict[str, FlagValue] = Field(default_factory=dict)
    axes: dict[str, Union[list[FlagValue], RangeAxis, ZipAxis]] = Field(default_factory=dict)
    seeds: Union[list[int], RangeAxis, None] = None
    seed_flag: str = "seed"
    exclude: list[dict[str, FlagValue]] = Field(default_factory=list)
    batch: dict[str, str] = Field(default_factory=dict)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    local: LocalSettings = Field(default_factory=LocalSettings)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[\w.-]+", value):
            raise ValueError(f"name '{value}' must be letters, digits, '_', '-' or '.'")
        return value

    @field_validator("script")
    @classmethod
    def _script(cls, value: str) -> str:
        if not re.fullmatch(r"\w+\.py", value):
            raise ValueError(f"script '{value}' must be an entry script at the repository root, e.g. inference_plms_glue.py")
        return value

    def module(self) -> str:
        return self.script[: -len(".py")]

    def axis_points(self) -> list[tuple[str, list[tuple[str | None, dict]]]]:
        """Per axis (seeds last): its points as (label, {flag: value}); an empty axis is an error."""
        axes = []
        for name, axis in self.axes.items():
            if isinstance(axis, ZipAxis):
                labels = axis.labels or [None] * axis.length()
                points = [(labels[i], {flag: values[i] for flag, values in axis.zip.items()}) for i in range(axis.length())]
            else:
                values = axis.values() if isinstance(axis, RangeAxis) else axis
                points = [(None, {name: value}) for value in values]
            if not points:
                raise SweepError(f"sweep '{self.name}': axis '{name}' is empty")
            axes.append((name, points))
        if self.seeds is not None:
            seeds = self.seeds.values() if isinstance(self.seeds, RangeAxis) else self.seeds
            if not seeds:
                raise SweepError(f"sweep '{self.name}': seeds is empty")
            axes.append(("seeds", [(None, {self.seed_flag: int(seed)}) for seed in seeds]))
        return axes


@dataclass
class Setting:
    """One point of a sweep: the script's flags, its id, its folder and the axis labels that name it."""

    sweep: str
    script: str
    flags: dict[str, Any]
    id: str
    folder: Path
    labels: dict[str, str] = field(default_factory=dict)
    varying: dict[str, Any] = field(default_factory=dict)  # axis values (a zipped axis by its label)

    def argv(self, output_flag: str | None = None) -> list[str]:
        flags = dict(self.flags)
        if output_flag:
            flags[output_flag] = str(self.output_folder)
        return flags_to_argv(flags)

    @property
    def output_folder(self) -> Path:
        """What ``output_flag`` passes to the script: ``<folder>/output``, a folder the script creates itself
        (merge_models.py and the other writers refuse an existing output folder) and may replace with
        --overwrite without touching the setting's record, log and lock beside it."""
        return self.folder / OUTPUT_SUBFOLDER


def flags_to_argv(flags: dict[str, Any]) -> list[str]:
    """``{name: value}`` as command-line tokens (see the module docstring for the value rules)."""
    argv: list[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        option = f"--{name}"
        if value is True:
            argv.append(option)
        elif isinstance(value, list):
            argv += [option, *(str(item) for item in value)]
        else:
            argv += [option, str(value)]
    return argv


def setting_id(script: str, flags: dict[str, Any]) -> str:
    """12 hex digits of sha256 over the script and the canonical JSON of its flags (stable across runs)."""
    canonical = json.dumps({"script": script, "flags": flags}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["flag=value", ...]`` (value read as YAML: 0.5, true, [a, b], null) as a dict of fixed flags."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        if not sep or not FLAG_NAME.match(name):
            raise SweepError(f"--set {item!r}: expected flag=value (the flag without its leading --)")
        try:
            overrides[name] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise SweepError(f"--set {item!r}: value is not valid YAML: {error}") from error
    return overrides


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep file; ``overrides`` replace or add fixed flags (``--set``).
    SweepError names the file and the failing keys."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SweepError(f"cannot read sweep file {path}: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise SweepError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a sweep file must be a mapping (name, script, fixed, axes, ...)")
    if overrides:
        data["fixed"] = {**(data.get("fixed") or {}), **overrides}
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors())
        raise SweepError(f"{path}: {problems}") from error
    for name in [*spec.fixed, *(flag for _, points in _safe_points(spec) for _, point in points for flag in point)]:
        if not FLAG_NAME.match(name):
            raise SweepError(f"{path}: '{name}' is not a flag name (write it without the leading --)")
    return spec


def _safe_points(spec: SweepSpec):
    try:
        return spec.axis_points()
    except SweepError:
        return []


def expand(spec: SweepSpec, output_root: str | Path | None = None) -> list[Setting]:
    """All settings of the sweep (axes crossed in file order, seeds last), minus the excluded ones.

    Raises SweepError for an empty axis, an axis flag that is also fixed or set by two axes, an exclude
    or batch entry naming nothing the sweep varies, and settings that share one output folder."""
    axes = spec.axis_points()
    root = Path(output_root if output_root is not None else spec.output_root)
    owners: dict[str, str] = {}
    for axis_name, points in axes:
        for flag in {flag for _, point in points for flag in point}:
            if flag in spec.fixed:
                raise SweepError(f"sweep '{spec.name}': flag '{flag}' is both fixed and varied by axis '{axis_name}'")
            if flag in owners and owners[flag] != axis_name:
                raise SweepError(f"sweep '{spec.name}': flag '{flag}' is varied by two axes ('{owners[flag]}', '{axis_name}')")
            owners[flag] = axis_name
    if spec.output_flag and (spec.output_flag in spec.fixed or spec.output_flag in owners):
        raise SweepError(f"sweep '{spec.name}': output_flag '{spec.output_flag}' is also set by the sweep's flags")
    axis_names = {name for name, _ in axes}
    for entry in spec.exclude:
        unknown = [key for key in entry if key not in owners and key not in axis_names]
        if unknown:
            raise SweepError(f"sweep '{spec.name}': exclude entry {entry} names {unknown}, which no axis varies")
    if spec.batch and spec.output_flag:
        raise SweepError(f"sweep '{spec.name}': batch and output_flag cannot be combined (a batched call has one output folder)")
    for flag in spec.batch:
        if flag not in owners:
            raise SweepError(f"sweep '{spec.name}': batch flag '{flag}' is not varied by any axis")
        axis = spec.axes.get(owners[flag])
        if isinstance(axis, ZipAxis):
            raise SweepError(f"sweep '{spec.name}': batch flag '{flag}' belongs to the zipped axis '{owners[flag]}'")
    settings: list[Setting] = []
    for combination in itertools.product(*(points for _, points in axes)):
        flags = dict(spec.fixed)
        labels: dict[str, str] = {}
        varying: dict[str, Any] = {}
        for (axis_name, _), (label, point) in zip(axes, combination):
            flags.update(point)
            if label is not None:
                labels[axis_name] = label
                varying[axis_name] = label
            else:
                varying.update(point)
        if any(_matches(entry, flags, labels) for entry in spec.exclude):
            continue
        identifier = setting_id(spec.script, flags)
        try:
            relative = spec.output.format(id=identifier, name=spec.name, **flags)
        except (KeyError, IndexError, ValueError) as error:
            raise SweepError(f"sweep '{spec.name}': output template '{spec.output}' cannot be formatted: {error!r}") from error
        settings.append(Setting(spec.name, spec.script, flags, identifier, root / relative, labels, varying))
    if not settings:
        raise SweepError(f"sweep '{spec.name}': every setting is excluded")
    check_collisions(settings)
    return settings


def _matches(entry: dict, flags: dict, labels: dict) -> bool:
    return all(labels.get(key) == value if key in labels else flags.get(key) == value for key, value in entry.items())


def check_collisions(settings: list[Setting]) -> None:
    """Two settings may not share one output folder (identical flags included)."""
    seen: dict[Path, Setting] = {}
    for setting in settings:
        key = Path(setting.folder)
        if key in seen:
            other = seen[key]
            differ = sorted(k for k in {*setting.flags, *other.flags} if setting.flags.get(k) != other.flags.get(k))
            detail = f"they differ only in {differ}" if differ else "their flags are identical"
            raise SweepError(f"sweep '{setting.sweep}': settings {other.id} and {setting.id} collide on output folder {key} ({detail}); "
                             f"add the varying flags to the 'output' template")
        seen[key] = setting
