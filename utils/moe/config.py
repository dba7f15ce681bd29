"""The MoE build's configuration: mergekit-moe's YAML keys, validated once with pydantic.

Keys (as users already write them for ``mergekit-moe``): ``base_model``, ``experts`` (each ``source_model``,
``positive_prompts``, ``negative_prompts``, ``noise_scale``, ``residual_scale``), ``gate_mode``,
``experts_per_token``, ``shared_experts``, ``dtype``, ``architecture``. Unknown keys are refused (a typo
would otherwise silently fall back to a default). Every error names the key path, e.g.
``experts[1].positive_prompts``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "hidden_mean", "cheap_embed", "random", "uniform_random")
PROMPT_GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "hidden_mean", "cheap_embed")
ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")
# mergekit-moe picks an output architecture by prefix of its display name ("Mixtral", "Qwen MoE", "Qwen3 MoE"),
# so its users write "qwen" and "qwen3"; those spellings are accepted here too.
ARCHITECTURE_ALIASES = {"mixtral": "mixtral", "qwen": "qwen2_moe", "qwen2": "qwen2_moe", "qwen2_moe": "qwen2_moe",
                        "qwen3": "qwen3_moe", "qwen3_moe": "qwen3_moe"}
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16"}


class MoEConfigError(ValueError):
    """A configuration that cannot be built: the message names the file and the key path."""


class ExpertConfig(BaseModel):
    """One dense model whose MLP becomes an expert (or the shared expert) in every layer."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)   # .nan / .inf would publish a broken model

    source_model: str = Field(min_length=1)
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = Field(default=None, ge=0.0)   # adds noise_scale·N(0, 1) to every MLP weight
    residual_scale: float | None = None                        # multiplies down_proj (the MLP's output)


class MoEConfig(BaseModel):
    """A mixture of experts: attention, embeddings and norms from `base_model`, one MLP per expert."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base_model: str = Field(min_length=1)
    experts: list[ExpertConfig]
    gate_mode: Literal[GATE_MODES] = "hidden"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    experts_per_token: int = Field(default=2, ge=1)
    shared_experts: list[ExpertConfig] | None = None
    architecture: Literal[ARCHITECTURES] | None = None

    @field_validator("architecture", "dtype", mode="before")
    @classmethod
    def _alias(cls, value, info: ValidationInfo):
        aliases = ARCHITECTURE_ALIASES if info.field_name == "architecture" else DTYPE_ALIASES
        return aliases.get(value.lower(), value) if isinstance(value, str) else value

    @field_validator("experts")
    @classmethod
    def _some_experts(cls, value):
        if not value:
            raise ValueError("at least one expert is needed")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.experts_per_token > len(self.experts):
            default = "" if "experts_per_token" in self.model_fields_set else " (the default)"
            raise ValueError(f"experts_per_token: {self.experts_per_token}{default} is larger than the number of "
                             f"experts ({len(self.experts)})")
        if self.gate_mode in PROMPT_GATE_MODES:
            groups = [("experts", self.experts), ("shared_experts", self.shared_experts or [])]
            for key, experts in groups:
                for index, expert in enumerate(experts):
                    if not expert.positive_prompts:
                        raise ValueError(f"{key}[{index}].positive_prompts: gate_mode {self.gate_mode} needs at "
                                         f"least one positive prompt for every expert")
            prompts = {(tuple(e.positive_prompts), tuple(e.negative_prompts or [])) for e in self.experts}
            if len(self.experts) > 1 and len(prompts) == 1:
                raise ValueError("experts[*].positive_prompts: every expert has the same prompts, so every router "
                                 "row would be the same vector; give each expert prompts of its own")
        return self

    @property
    def all_experts(self) -> list[ExpertConfig]:
        return list(self.experts) + list(self.shared_experts or [])


def _key_path(location: tuple) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def describe_validation_error(error: ValidationError) -> str:
    """pydantic's first error as one line: ``key.path: message``."""
    first = error.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    path = _key_path(tuple(first["loc"]))
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    if first["type"] == "missing":
        return f"{path}: required key is missing"
    if first["type"] == "literal_error" and "input" in first:
        message = f"{first['input']!r} is not valid; {message.removeprefix('Input should be ')}"
    return f"{path}: {message}" if path else message


def parse_moe_config(data, source: str = "config") -> MoEConfig:
    """Validate an already-parsed mapping (e.g. from YAML); errors raise MoEConfigError naming the key path."""
    if not isinstance(data, dict):
        raise MoEConfigError(f"{source}: expected a mapping of keys (base_model, experts, ...), "
                             f"got {type(data).__name__}")
    try:
        return MoEConfig.model_validate(data)
    except ValidationError as error:
        raise MoEConfigError(f"{source}: {describe_validation_error(error)}") from None


def load_moe_config(path: str | Path) -> tuple[MoEConfig, str]:
    """The validated config of a YAML file and the file's text (kept verbatim for the model card)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise MoEConfigError(f"{path}: cannot read the config ({error.strerror or error})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise MoEConfigError(f"{path}: not valid YAML{where}") from None
    return parse_moe_config(data, str(path)), text
