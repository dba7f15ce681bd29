"""The recipe file: mergekit's YAML schema, validated with pydantic, and multi-document recipes.

Every problem is reported as a RecipeError whose message names the file, the key path
(`slices[0].sources[1].layer_range`) and the problem, before any tensor is read.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model_merging_methods import MergeError
from model_merging_methods.registry import REGISTRY

DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64")
CHAT_TEMPLATE_NAMES = ("alpaca", "chatml", "llama3", "mistral")


class RecipeError(MergeError):
    """A recipe that cannot be run: the message names the file, key path and problem."""


def normalize_dtype(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("torch."):
        value = value[len("torch."):]
    if value is not None and value not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {value!r}; valid: {', '.join(DTYPE_NAMES)}")
    return value


# ----------------------------------------------------------------------------------------------
# parameter settings: scalar | gradient (list of scalars) | conditional list [{filter, value}]

SCALAR_TYPES = (bool, int, float, str)


def check_setting(value: Any, where: str) -> Any:
    """A parameter setting's structure; returns it unchanged. Types are checked per method later."""
    if isinstance(value, SCALAR_TYPES):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{where}: an empty list is not a setting")
        if all(isinstance(v, SCALAR_TYPES) for v in value):
            return value
        for index, entry in enumerate(value):
            if not isinstance(entry, dict):
                raise ValueError(f"{where}[{index}]: expected {{filter, value}} in a conditional list, got {entry!r}")
            unknown = sorted(set(entry) - {"filter", "value"})
            if unknown:
                raise ValueError(f"{where}[{index}]: unknown key {unknown[0]!r} (a condition has filter and value)")
            if "value" not in entry:
                raise ValueError(f"{where}[{index}]: missing 'value'")
            if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                raise ValueError(f"{where}[{index}].filter: must be a string (a substring of the tensor name), "
                                 f"got {entry['filter']!r}")
            inner = entry["value"]
            if not (isinstance(inner, SCALAR_TYPES) or
                    (isinstance(inner, list) and inner and all(isinstance(v, SCALAR_TYPES) for v in inner))):
                raise ValueError(f"{where}[{index}].value: must be a scalar or a gradient (list of numbers), "
                                 f"got {inner!r}")
        return value
    raise ValueError(f"{where}: expected a scalar, a gradient list or a conditional list, got {value!r}")


# Numeric parameters' ranges, by name (a name means one thing in every method). Every number must also be
# finite (YAML's .nan / .inf, or the strings "nan" / "inf", would be coerced to a float and merged).
# density: the fraction kept, and DARE's rescale divides by it, so 0 is refused; gamma / epsilon: fractions.
PARAMETER_RANGES = {"density": (0.0, 1.0, False), "gamma": (0.0, 1.0, True), "epsilon": (0.0, 1.0, True)}
# slerp's t interpolates between its two models (outside [0, 1] it would extrapolate off the arc)
METHOD_PARAMETER_RANGES = {("slerp", "t"): (0.0, 1.0, True)}


def _numbers(setting: Any) -> list:
    """Every number-like scalar of a setting (scalars, gradients, conditional lists' values)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        found = []
        for entry in setting:
            found += _numbers(entry["value"]) if isinstance(entry, dict) else _numbers(entry)
        return found
    return [setting] if isinstance(setting, (int, float, str)) and not isinstance(setting, bool) else []


def _as_number(value: Any) -> Optional[float]:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return float(value)


def check_numbers(name: str, setting: Any, where: str, method: Optional[str] = None) -> None:
    """Every number of a setting is finite and inside its parameter's range (ValueError naming it)."""
    bounds = METHOD_PARAMETER_RANGES.get((method, name), PARAMETER_RANGES.get(name))
    for raw in _numbers(setting):
        number = _as_number(raw)
        if number is None:
            continue
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"{where}: {name} must be a finite number, got {raw!r}")
        if bounds is not None:
            low, high, low_inclusive = bounds
            if not ((low <= number if low_inclusive else low < number) and number <= high):
                interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}]"
                raise ValueError(f"{where}: {name} must be in {interval}, got {raw!r}")


def _check_parameters(value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if value is None:
        return None
    for name, setting in value.items():
        check_setting(setting, "@" + str(name))  # '@': the formatter joins this path to the key path
        check_numbers(str(name), setting, "@" + str(name))
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelRef(BaseModel):
    """`path_or_hub_id[@revision][+adapter]`: mergekit's `base+adapter` reads the base with a PEFT LoRA
    adapter (folder or hub id) folded in per tensor (utils/lora/fold.py)."""

    path: str
    revision: Optional[str] = None
    adapter: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        adapter = None
        if "+" in text and not Path(text).expanduser().is_dir():
            text, _, adapter = text.rpartition("+")
            if not text or not adapter:
                raise ValueError(f"{text}+{adapter}: a LoRA reference is 'base+adapter' (both parts non-empty)")
        path, _, revision = text.partition("@")
        if not path:
            raise ValueError(f"{text!r}: empty model reference")
        return cls(path=path, revision=revision or None, adapter=adapter)

    def __str__(self) -> str:
        return self.path + (f"@{self.revision}" if self.revision else "") + (f"+{self.adapter}" if self.adapter else "")


def _model_ref(value: Any) -> str:
    if isinstance(value, dict):  # mergekit's dict form {model: {path, revision}} / {path, revision}
        inner = value.get("model", value)
        if not isinstance(inner, dict) or "path" not in inner or set(value) - {"model", "path", "revision"}:
            raise ValueError(f"unsupported model reference {value!r} (use 'path[@revision]')")
        value = inner["path"] + (f"@{inner['revision']}" if inner.get("revision") else "")
    if not isinstance(value, str):
        raise ValueError(f"a model reference must be a string 'path[@revision]', got {value!r}")
    ModelRef.parse(value)
    return value


class InputModel(_Strict):
    model: str
    parameters: Optional[dict[str, Any]] = None

    _ref = field_validator("model", mode="before")(classmethod(lambda cls, v: _model_ref(v)))
    _params = field_validator("parameters")(classmethod(lambda cls, v: _check_parameters(v)))


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[dict[str, Any]] = None

    _ref = field_validator("model", mode="before")(classmethod(lambda cls, v: _model_ref(v)))
    _params = field_validator("parameters")(classmethod(lambda cls, v: _check_parameters(v)))

    @model_validator(mode="before")
    @classmethod
    def _placeholder(cls, data: Any) -> Any:
        """An example's `layer_range: [0, N]` (a word where a layer number goes) must be filled in: refused
        with what to write, instead of a type error."""
        if isinstance(data, dict) and isinstance(data.get("layer_range"), (list, tuple)):
            words = [v for v in data["layer_range"] if isinstance(v, str) and not v.strip().lstrip("-").isdigit()]
            if words:
                raise ValueError(f"@layer_range: {list(data['layer_range'])} holds the placeholder {words[0]!r}: "
                                 f"write layer numbers of {data.get('model', 'the model')} (its config.json's "
                                 f"num_hidden_layers is the end of a range over all its layers)")
        return data

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"layer_range {list(value)} must be [start, end) with 0 <= start < end")
        return value


class OutputSlice(_Strict):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    residual_weight: Optional[float] = None   # accepted and unused, as in mergekit 0.1.5

    _ref = field_validator("base_model", mode="before")(classmethod(lambda cls, v: None if v is None else _model_ref(v)))
    _params = field_validator("parameters")(classmethod(lambda cls, v: _check_parameters(v)))

    @model_validator(mode="after")
    def _same_lengths(self) -> "OutputSlice":
        lengths = [s.layer_range[1] - s.layer_range[0] for s in self.sources]
        if len(set(lengths)) > 1:
            spans = ", ".join(f"{s.model} {list(s.layer_range)}" for s in self.sources)
            raise ValueError(f"every source of a slice must span the same number of layers; got {lengths} ({spans})")
        return self

    @property
    def num_layers(self) -> int:
        return self.sources[0].layer_range[1] - self.sources[0].layer_range[0]


class ModelTokenSource(_Strict):
    kind: Literal["model_token"]
    model: str
    token_id: Optional[int] = None
    token: Optional[str] = None

    _ref = field_validator("model", mode="before")(classmethod(lambda cls, v: _model_ref(v)))

    @model_validator(mode="after")
    def _one(self) -> "ModelTokenSource":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroSource(_Strict):
    kind: Literal["zero"]


class TokenSpec(_Strict):
    source: Union[ModelTokenSource, ZeroSource, str, None] = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value: Any) -> Any:
        return value if value is None or isinstance(value, dict) else _model_ref(value)


class TokenizerSpec(_Strict):
    source: str = "union"
    tokens: Optional[dict[str, TokenSpec]] = None
    pad_to_multiple_of: Optional[int] = Field(default=None, gt=0)

    _ref = field_validator("source", mode="before")(classmethod(lambda cls, v: _model_ref(v)))


class DareBlock(_Strict):
    """The paper's DARE before the merge (docs/methods.md, DARE): the default drop rate of every model (a model's
    `drop_rate` parameter overrides it, with gradients and filters like any parameter) and the settings."""

    drop_rate: float = 0.0
    strategy: Literal["random", "magnitude"] = "random"
    rescale: bool = True
    rescale_mode: Literal["paper", "l1"] = "paper"
    weight_format: Literal["delta_weight", "finetuned_weight"] = "delta_weight"
    magnitude_rule: Literal["exact_count", "original"] = "exact_count"

    @field_validator("drop_rate")
    @classmethod
    def _rate(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"drop_rate {value} is outside [0, 1)")
        return value


class Recipe(_Strict):
    """One merge (one YAML document)."""

    name: Optional[str] = None
    merge_method: str
    base_model: Optional[str] = None
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Optional[dict[str, Any]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerSpec] = None
    chat_template: Optional[str] = None
    dare: Optional[DareBlock] = None

    _ref = field_validator("base_model", "tokenizer_source", mode="before")(
        classmethod(lambda cls, v: None if v is None else _model_ref(v)))
    _params = field_validator("parameters")(classmethod(lambda cls, v: _check_parameters(v)))
    _dtypes = field_validator("dtype", "out_dtype", mode="before")(classmethod(lambda cls, v: normalize_dtype(v)))

    @field_validator("merge_method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in REGISTRY:
            raise ValueError(f"unknown merge_method {value!r}; valid: {', '.join(sorted(REGISTRY))}")
        return value

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: Optional[str]) -> Optional[str]:
        if value is None or value in CHAT_TEMPLATE_NAMES or value == "auto":
            return value
        if "{" in value and len(value) >= 20:
            return value
        raise ValueError(f"chat_template {value!r} is neither a built-in name ({', '.join(CHAT_TEMPLATE_NAMES)}), "
                         f"'auto', nor a Jinja template (a literal must contain '{{' and be >= 20 characters)")

    @model_validator(mode="after")
    def _structure(self) -> "Recipe":
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' or 'slices'" if self.models or self.slices
                             else "missing 'models' or 'slices' (one of them is required)")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give 'tokenizer_source' or 'tokenizer', not both")
        for path, settings in self._parameter_scopes():
            for name, setting in settings.items():
                check_numbers(str(name), setting, f"@{path}.{name}", self.merge_method)   # '@': see _format_validation
        self._check_linear_sums()
        return self

    def _parameter_scopes(self) -> list[tuple[str, dict]]:
        scopes = [("parameters", self.parameters or {})]
        scopes += [(f"models[{i}].parameters", m.parameters or {}) for i, m in enumerate(self.models or [])]
        for i, piece in enumerate(self.slices or []):
            scopes.append((f"slices[{i}].parameters", piece.parameters or {}))
            scopes += [(f"slices[{i}].sources[{j}].parameters", s.parameters or {}) for j, s in enumerate(piece.sources)]
        return scopes

    def _check_linear_sums(self) -> None:
        """linear with normalize (its default) divides by Σ weight: constant weights summing to 0 are refused
        here (weights that vary by layer or tensor are caught by the writer's last check on non-finite output)."""
        if self.merge_method != "linear":
            return
        groups = [("models", self.parameters, [m.parameters for m in self.models or []])]
        groups += [(f"slices[{i}]", _merged(self.parameters, piece.parameters), [s.parameters for s in piece.sources])
                   for i, piece in enumerate(self.slices or [])]
        for where, shared, own in groups:
            normalize = (shared or {}).get("normalize", True)
            if normalize in (False, 0, "false", "False", "no", "off", "0"):
                continue
            weights = [(p or {}).get("weight", (shared or {}).get("weight")) for p in own]
            numbers = [_as_number(w) if isinstance(w, (int, float, str)) and not isinstance(w, bool) else None
                       for w in weights]
            if len(numbers) > 1 and None not in numbers and sum(numbers) == 0:
                raise ValueError(f"@{where}: the linear weights {numbers} sum to 0, and normalize (the default) "
                                 f"divides by their sum; set normalize: false or change the weights")

    # -- what the recipe refers to

    def referenced_models(self) -> list[str]:
        """Every model reference, in first-mention order (base first): the order inputs are listed."""
        refs = [self.base_model] if self.base_model else []
        for model in self.models or []:
            refs.append(model.model)
        for piece in self.slices or []:
            refs += ([piece.base_model] if piece.base_model else []) + [s.model for s in piece.sources]
        return list(dict.fromkeys(refs))

    def tokenizer_choice(self) -> tuple[Optional[str], dict[str, TokenSpec], Optional[int]]:
        """(source, per-token specs, pad_to_multiple_of); source None = copy the donor's tokenizer files."""
        if self.tokenizer is not None:
            return self.tokenizer.source, dict(self.tokenizer.tokens or {}), self.tokenizer.pad_to_multiple_of
        return self.tokenizer_source, {}, None


def _merged(outer: Optional[dict], inner: Optional[dict]) -> dict:
    return {**(outer or {}), **(inner or {})}


def _path_text(loc: tuple) -> str:
    """('slices', 0, 'sources', 1, 'layer_range') → 'slices[0].sources[1].layer_range'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + str(part)
    return text or "(top level)"


def _format_validation(error: ValidationError, source: str) -> str:
    """The first problem of a pydantic error, as 'file: key.path: message'."""
    problems = []
    for item in error.errors():
        # drop pydantic's names of union alternatives and validators from the location
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and ("[" in p or "-" in p or p in
                                                                            ("str", "int", "bool", "float"))))
        message = item["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown key {loc[-1]!r}"
            loc = loc[:-1]
        elif item["type"] == "missing":
            message = f"missing required key {loc[-1]!r}"
            loc = loc[:-1]
        if message.startswith("@"):
            inner, _, message = message[1:].partition(": ")
            loc = loc + (inner,)
        problems.append(f"{_path_text(loc)}: {message}")
    # a tokens' source union reports one error per alternative: the first one is the most specific
    return f"{source}: " + problems[0]


def parse_recipe(data: Any, source: str) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe document must be a mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_format_validation(error, source)) from None


def load_recipe_file(path: str | Path) -> tuple[list[Recipe], list[str]]:
    """All documents of a recipe file and their verbatim texts; YAML errors name line and column.

    A multi-document file needs a unique `name` per document (later documents may use earlier names as
    models); references may not form a cycle."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error.strerror})") from None
    try:
        documents = [d for d in yaml.safe_load_all(text)]
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: YAML syntax error{where}: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: YAML error: {error}") from None
    texts = [t.strip("\n") + "\n" for t in re.split(r"^---\s*$", text, flags=re.MULTILINE) if t.strip()]
    documents = [d for d in documents if d is not None]
    if not documents:
        raise RecipeError(f"{path}: the recipe file is empty")
    if len(texts) != len(documents):
        texts = [yaml.safe_dump(d, sort_keys=False) for d in documents]
    label = (lambda i: f"{path} (document {i + 1})") if len(documents) > 1 else (lambda i: str(path))
    recipes = [parse_recipe(d, label(i)) for i, d in enumerate(documents)]
    if len(recipes) > 1:
        check_documents(recipes, str(path))
    return recipes, texts


def check_documents(recipes: list[Recipe], source: str) -> None:
    """Names present and unique; references to names point backwards or forwards without a cycle."""
    names: dict[str, int] = {}
    for index, recipe in enumerate(recipes):
        if not recipe.name:
            raise RecipeError(f"{source} (document {index + 1}): name: missing (every document of a multi-document "
                              f"recipe needs a unique 'name')")
        if recipe.name in names:
            raise RecipeError(f"{source} (document {index + 1}): name: {recipe.name!r} is already used by "
                              f"document {names[recipe.name] + 1}")
        names[recipe.name] = index
    edges = {r.name: [ModelRef.parse(m).path for m in r.referenced_models() if ModelRef.parse(m).path in names]
             for r in recipes}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 1:
            cycle = trail[trail.index(name):] + [name]
            raise RecipeError(f"{source}: the documents refer to each other in a cycle: {' -> '.join(cycle)}")
        if state.get(name) == 2:
            return
        state[name] = 1
        for target in edges[name]:
            visit(target, trail + [name])
        state[name] = 2

    for name in names:
        visit(name, [])


def run_order(recipes: list[Recipe]) -> list[Recipe]:
    """Documents ordered so that every document runs after the ones it uses (stable otherwise)."""
    names = {r.name for r in recipes}
    done: list[str] = []
    by_name = {r.name: r for r in recipes}

    def visit(recipe: Recipe) -> None:
        if recipe.name in done:
            return
        for ref in recipe.referenced_models():
            target = ModelRef.parse(ref).path
            if target in names and target != recipe.name:
                visit(by_name[target])
        done.append(recipe.name)

    for recipe in recipes:
        visit(recipe)
    return [by_name[name] for name in done]
