"""Recipe templates: a merge recipe (mergekit-style YAML) in which some values are free parameters.

A free parameter is a mapping with the single key ``free`` wherever the recipe takes a value:

    parameters: {weight: {free: {range: [0.0, 1.5]}}, density: {free: {range: [0.1, 1.0], init: 0.5}}}
    merge_method: {free: {choices: [ties, dare_ties]}}
    weight: [{free: {range: [0, 1]}}, {free: {range: [0, 1]}}]      # a per-layer gradient: one free point each

``range: [low, high]`` is continuous (``init`` optional: the search's start, default the middle; ``log: true``
searches log-uniformly); ``choices: [...]`` picks one of a list (method choice). Free parameters with the same
``name`` share one value (e.g. one λ for every model); each needs the same range or choices. The search sees
every free dimension as [0, 1] (``Space``); ``Space.values`` maps a point back to recipe values and
``Template.instantiate`` gives the concrete recipe. Anything wrong is a ``TemplateError`` naming the position.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from model_merging_methods import MergeError


class TemplateError(MergeError):
    """A user error in a recipe template (exit 2, one line)."""


@dataclass(frozen=True)
class FreeParameter:
    name: str                                 # the ``name`` given, else the position (e.g. models[1].parameters.weight)
    low: Optional[float] = None
    high: Optional[float] = None
    choices: Optional[tuple] = None
    log: bool = False
    init: Optional[float] = None

    def value(self, unit: float) -> Any:
        """The recipe value at ``unit`` ∈ [0, 1]."""
        unit = min(1.0, max(0.0, float(unit)))
        if self.choices is not None:
            return self.choices[min(len(self.choices) - 1, int(unit * len(self.choices)))]
        if self.log:
            return float(math.exp(math.log(self.low) + unit * (math.log(self.high) - math.log(self.low))))
        return float(self.low + unit * (self.high - self.low))

    def unit(self, value: Any) -> float:
        """The point in [0, 1] of a recipe value (the middle of a choice's cell)."""
        if self.choices is not None:
            return (self.choices.index(value) + 0.5) / len(self.choices)
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (float(value) - self.low) / (self.high - self.low) if self.high > self.low else 0.5

    def start(self) -> float:
        return self.unit(self.init) if self.init is not None else 0.5

    def describe(self) -> dict:
        if self.choices is not None:
            return {"name": self.name, "choices": list(self.choices)}
        return {"name": self.name, "range": [self.low, self.high], "log": self.log, "init": self.init}


def _parse_free(spec: Any, where: str) -> FreeParameter:
    if not isinstance(spec, dict):
        raise TemplateError(f"free parameter {where} has no range: give free: {{range: [low, high]}} or "
                            f"free: {{choices: [...]}}")
    unknown = set(spec) - {"range", "choices", "name", "log", "init"}
    if unknown:
        raise TemplateError(f"free parameter {where}: unknown key(s) {', '.join(sorted(unknown))} "
                            f"(valid: range, choices, name, log, init)")
    name = str(spec.get("name") or where)
    if ("range" in spec) == ("choices" in spec):
        raise TemplateError(f"free parameter {where} has no range: give exactly one of range: [low, high] or choices")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or len(choices) < 2:
            raise TemplateError(f"free parameter {where}: choices must be a list of at least two values")
        return FreeParameter(name, choices=tuple(choices))
    bounds = spec["range"]
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                                 and math.isfinite(b) for b in bounds)):
        raise TemplateError(f"free parameter {where} has no valid range: range must be [low, high] numbers, got {bounds!r}")
    low, high = float(bounds[0]), float(bounds[1])
    if not low < high:
        raise TemplateError(f"free parameter {where}: range [{low}, {high}] is empty (low must be < high)")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise TemplateError(f"free parameter {where}: a log range needs low > 0, got {low}")
    init = spec.get("init")
    if init is not None and not (isinstance(init, (int, float)) and low <= float(init) <= high):
        raise TemplateError(f"free parameter {where}: init {init!r} is outside its range [{low}, {high}]")
    return FreeParameter(name, low, high, log=log, init=None if init is None else float(init))


def _path(where: str, key: Any) -> str:
    return f"{where}[{key}]" if isinstance(key, int) else (f"{where}.{key}" if where else str(key))


def _walk(node: Any, where: str, found: list[tuple[str, FreeParameter]]) -> None:
    if isinstance(node, dict):
        if "free" in node:
            if len(node) != 1:
                raise TemplateError(f"free parameter {where}: 'free' must be the only key of its mapping")
            found.append((where, _parse_free(node["free"], where)))
            return
        for key, value in node.items():
            _walk(value, _path(where, key), found)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _walk(value, _path(where, index), found)


def _substitute(node: Any, where: str, values: dict[str, Any], names: dict[str, str]) -> Any:
    if isinstance(node, dict):
        if "free" in node:
            return values[names[where]]
        return {key: _substitute(value, _path(where, key), values, names) for key, value in node.items()}
    if isinstance(node, list):
        return [_substitute(value, _path(where, index), values, names) for index, value in enumerate(node)]
    return node


@dataclass(frozen=True)
class Space:
    """The search space: one [0, 1] dimension per distinct free parameter."""

    parameters: tuple[FreeParameter, ...]

    @property
    def dimensions(self) -> int:
        return len(self.parameters)

    def values(self, point) -> dict[str, Any]:
        return {p.name: p.value(u) for p, u in zip(self.parameters, point)}

    def start(self) -> list[float]:
        return [p.start() for p in self.parameters]

    def point(self, values: dict[str, Any]) -> list[float]:
        return [p.unit(values[p.name]) for p in self.parameters]


class Template:
    """A recipe template (one YAML document) and its free parameters."""

    def __init__(self, document: dict, text: str, source: str):
        if not isinstance(document, dict):
            raise TemplateError(f"{source}: a recipe template must be one mapping (a recipe document)")
        self.document, self.text, self.source = document, text, source
        found: list[tuple[str, FreeParameter]] = []
        _walk(document, "", found)
        if not found:
            raise TemplateError(f"{source}: the template has no free parameter (nothing to search)")
        self.names = {where: parameter.name for where, parameter in found}
        distinct: dict[str, FreeParameter] = {}
        for where, parameter in found:
            seen = distinct.setdefault(parameter.name, parameter)
            if (seen.low, seen.high, seen.choices, seen.log) != (parameter.low, parameter.high, parameter.choices, parameter.log):
                raise TemplateError(f"free parameter {where}: shares the name {parameter.name!r} but not the range "
                                    f"or choices of its other occurrence")
        self.space = Space(tuple(distinct.values()))

    @classmethod
    def load(cls, path: str | Path, variables: Optional[dict[str, str]] = None) -> "Template":
        """Read a template; ``${NAME}`` in its text is replaced by ``variables[NAME]`` first (model folders:
        search_merge.py passes each expert as ${TASK} and --var NAME=VALUE)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise TemplateError(f"{path}: cannot read the template ({error.strerror})") from None
        try:
            text = string.Template(text).substitute(variables or {})
        except KeyError as error:
            raise TemplateError(f"{path}: variable ${{{error.args[0]}}} is not set (pass --var "
                                f"{error.args[0]}=VALUE or --experts {error.args[0]}=FOLDER)") from None
        except ValueError as error:
            raise TemplateError(f"{path}: bad $-placeholder ({error})") from None
        try:
            documents = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as error:
            raise TemplateError(f"{path}: YAML error: {' '.join(str(error).split())}") from None
        if len(documents) != 1:
            raise TemplateError(f"{path}: a template must hold exactly one recipe document, found {len(documents)}")
        return cls(documents[0], text, str(path))

    @property
    def fingerprint(self) -> str:
        """sha256 of the template's content (canonical JSON): a resumed history must come from the same one."""
        return hashlib.sha256(json.dumps(self.document, sort_keys=True, default=str).encode()).hexdigest()

    def instantiate(self, values: dict[str, Any]) -> dict:
        """The concrete recipe document for ``values`` (name → value)."""
        return _substitute(copy.deepcopy(self.document), "", values, self.names)

    def recipe(self, values: dict[str, Any]):
        """The validated Recipe (utils.recipes.schema) for ``values``."""
        from utils.recipes.schema import parse_recipe

        return parse_recipe(self.instantiate(values), f"{self.source} (instantiated)")

    def yaml(self, values: dict[str, Any], header: str = "") -> str:
        return header + yaml.safe_dump(self.instantiate(values), sort_keys=False)
