"""Model resolution of the LLM pipeline: paper model names, folders and hub ids, backbones and their check.

* ``model_entry(name)``: the paper's model table row (hub id, backbone, task) from ``configs/llm_tasks.yaml``;
* ``resolve_model(name)``: a folder (as given, else under ``--model_dir`` / ``$MERGELM_MODEL_DIR``), else
  the hub id of a paper model name, else ``name`` as a hub id;
* ``backbone_name(...)`` / ``common_backbone(...)``: the backbone θ_pre of one / several fine-tuned models;
* ``check_backbone(finetuned, backbone)``: refuse deltas against a model of another architecture or RoPE base;
* ``model_label(name)``: the name used in output folders.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from utils.llm.prompts import load_task_config

MODEL_DIR_ENV = "MERGELM_MODEL_DIR"
_ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "intermediate_size", "rope_theta")
logger = logging.getLogger("mergelm.llm")


class BackboneMismatchError(ValueError):
    """The fine-tuned model was not trained from the given backbone (architecture or RoPE differs)."""


@dataclass(frozen=True)
class ModelEntry:
    """One row of the paper's model table: hub id (None = local folder only), backbone name, task."""

    name: str
    hub_id: str | None
    backbone: str | None
    task: str | None


def model_entry(name: str, config: Mapping[str, Any] | None = None) -> ModelEntry | None:
    """The paper's table row for ``name`` (a short name such as ``WizardMath-13B-V1.0``), or None."""
    config = config or load_task_config()
    row = config["models"].get(name)
    if row is None:
        return None
    return ModelEntry(name=name, hub_id=row.get("hub_id"), backbone=row.get("backbone"), task=row.get("task"))


def model_label(name: str) -> str:
    """Name used in output folders: the name itself, or the last part of a path / hub id."""
    return re.sub(r"[^\w.+-]", "_", Path(name.rstrip("/")).name) or "model"


def resolve_model(name: str, model_dir: str | None = None) -> str:
    """A folder (``name`` itself, else ``<model_dir>/<name>``), else the hub id of a paper model name,
    else ``name`` as a hub id (``org/model``). Raises FileNotFoundError naming what was tried."""
    if Path(name).is_dir():
        return name
    folder = model_dir or os.environ.get(MODEL_DIR_ENV)
    if folder and (Path(folder) / name).is_dir():
        return str(Path(folder) / name)
    entry = model_entry(name)
    if entry is not None:
        if entry.hub_id:
            return entry.hub_id
        raise FileNotFoundError(f"model '{name}' has no hub release usable as is; put its folder under --model_dir "
                                f"(or ${MODEL_DIR_ENV}) or pass a path")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return name
    raise FileNotFoundError(f"model '{name}': not a folder, not under --model_dir/${MODEL_DIR_ENV}, not a paper "
                            f"model name and not a hub id (org/name)")


def backbone_name(finetuned: str, *, pretrained: str | None = None, llama2_backbone: bool = False) -> str | None:
    """θ_pre of one fine-tuned model: ``pretrained`` when given; with ``llama2_backbone`` the paper's Llama-2
    backbone of WizardCoder-Python-7B/13B (its wrong-backbone experiment); else the table's backbone or None."""
    if pretrained:
        return pretrained
    config = load_task_config()
    if llama2_backbone:
        mapping = config["wizardcoder_llama2_backbones"]
        if finetuned not in mapping:
            raise ValueError(f"--wizardcoder_use_llama2_as_backbone applies to {sorted(mapping)}, not {finetuned}")
        return mapping[finetuned]
    entry = model_entry(finetuned, config)
    return entry.backbone if entry else None


def common_backbone(names: Sequence[str]) -> str:
    """The one backbone all the paper models ``names`` share; ValueError when unknown or different."""
    backbones = {entry.backbone if (entry := model_entry(name)) else None for name in names}
    if len(backbones) != 1 or None in backbones:
        raise ValueError(f"the backbone of all the fine-tuned models should be the same and known; got "
                         f"{sorted(map(str, backbones))} — pass --pretrained_model_name")
    return backbones.pop()


def _architecture(source: str) -> dict[str, Any]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    values = {name: getattr(config, name, None) for name in _ARCHITECTURE_FIELDS}
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if values["rope_theta"] is None and isinstance(rope, dict):
        values["rope_theta"] = rope.get("rope_theta")
    values["vocab_size"] = getattr(config, "vocab_size", None)
    return values


def check_backbone(finetuned: str, backbone: str, *, allow_mismatch: bool = False) -> dict[str, Any]:
    """Compare the configs of a fine-tuned model and its claimed backbone.

    Architecture fields and the RoPE base must be equal (a Code Llama model has rope_theta 1e6, Llama 2
    1e4), and the vocabularies may differ by at most 2 rows (the paper's pad-token alignment).
    Raises BackboneMismatchError naming the field and both values, unless ``allow_mismatch``.
    """
    tuned, base = _architecture(finetuned), _architecture(backbone)
    problems = [f"{name}: {tuned[name]} in {finetuned} vs {base[name]} in {backbone}"
                for name in _ARCHITECTURE_FIELDS if tuned[name] != base[name]]
    if tuned["vocab_size"] is not None and base["vocab_size"] is not None \
            and abs(tuned["vocab_size"] - base["vocab_size"]) > 2:
        problems.append(f"vocab_size: {tuned['vocab_size']} vs {base['vocab_size']} (more than the pad-token "
                        f"alignment can reconcile)")
    if problems and not allow_mismatch:
        raise BackboneMismatchError(
            f"{finetuned} does not look fine-tuned from {backbone}: " + "; ".join(problems)
            + ". Deltas against a different backbone are meaningless (e.g. a Code-Llama-based model against "
              "Llama 2); pass the right --pretrained_model_name, or --allow_backbone_mismatch to proceed anyway")
    for problem in problems:
        logger.warning("backbone mismatch allowed: %s", problem)
    return {"finetuned": tuned, "backbone": base, "mismatches": problems}
