"""Several drop settings of one fine-tuned model from one load: the per-setting cost is the mask and the
evaluation, not reading the checkpoints.

For each setting (DareOptions, seed) the model's weights are rebuilt from the fine-tuned state kept in
memory and the base state (docs/mergelm-spec.md §4.6):
  delta_weight:     θ' = θ_pre + M(θ_ft − θ_pre)      finetuned_weight:  θ' = M(θ_ft)
exactly as one call of inference_plms_glue.py with that single rate and seed computes it (the masks
depend only on (seed, model index 0, tensor name, position)), so a batched call writes the same numbers.
Settings whose weights cannot differ are evaluated once: rate 0 (the fine-tuned model) and magnitude
pruning (no random draw) do not depend on the seed.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator

from model_merging_methods import DareOptions, dare_state_dict


@dataclass(frozen=True)
class DropSetting:
    """One drop setting: how to drop (rate, rescale, strategy, format) and the mask seed."""

    options: DareOptions
    seed: int


def drop_settings(rates: list[float], seeds: list[int], rescale: bool, strategy: str, weight_format: str) -> list[DropSetting]:
    """Every (rate, seed) pair, rates outer, with the same rescale / strategy / format."""
    return [DropSetting(DareOptions(drop_rate=float(rate), rescale=rescale, strategy=strategy, weight_format=weight_format), int(seed))
            for rate, seed in itertools.product(rates, seeds)]


def same_weights_key(setting: DropSetting) -> tuple:
    """Settings with equal keys have identical dropped weights (the seed only matters for random drops)."""
    options = setting.options
    if options.drop_rate == 0.0:
        return (0.0,)
    seed = setting.seed if options.strategy == "random" else None
    return (options.drop_rate, options.rescale, options.strategy, options.weight_format, seed)


def evaluate_drop_settings(model, base_state: dict | None, settings: list[DropSetting], evaluate: Callable,
                           exclude_regex: list[str]) -> Iterator[tuple[DropSetting, object]]:
    """Yield ``(setting, evaluate(model))`` for each setting, the model's weights dropped as the setting says.

    ``model`` holds the fine-tuned weights on entry (kept as they are, and restored at the end); ``base_state``
    is θ_pre (needed only when a rate is above 0). Rate 0 evaluates the fine-tuned model itself."""
    finetuned = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    evaluated: dict = {}
    try:
        for setting in settings:
            key = same_weights_key(setting)
            if key in evaluated:
                yield setting, evaluated[key]
                continue
            if setting.options.drop_rate == 0.0:
                model.load_state_dict(finetuned)
            else:
                if base_state is None:
                    raise ValueError("a drop rate above 0 needs the pretrained (base) weights")
                model.load_state_dict(dare_state_dict(finetuned, base_state, setting.options, seed=setting.seed, model_index=0,
                                                      exclude_regex=exclude_regex))
            evaluated[key] = evaluate(model)
            yield setting, evaluated[key]
    finally:
        model.load_state_dict(finetuned)
