"""No tensor left behind: the fate of every input tensor in a merge plan, and a refusal for any without one.

A plan says, per output tensor, which input tensors it is made from (input label → that input's tensor
name): the PlannedGroup.sources of the groups the one executor runs (utils/engine/plan.py), for flags and
recipes alike, and merge_moe's plan. Every tensor of every input then has exactly one fate:
- merged: it feeds an output tensor that two or more inputs feed;
- copied: it is the only source of an output tensor of the same name;
- renumbered: it is the only source of an output tensor of another name (a layer moved by slices, an
  expert MLP moved into a mixture of experts);
- dropped: no output uses it and a rule the user wrote says so (a slice's layer_range, an exclusion
  regex, a merge_moe rule), named in the manifest with its count.
Any other tensor would silently vanish from the output (mergekit's Qwen3.5-MoE `linear_attn` and Qwen3-VL
`model.visual.*` losses): `account` raises UnaccountedTensors naming them, grouped by family.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

FATES = ("merged", "copied", "renumbered", "dropped")
_INDEX = re.compile(r"\.\d+(?=\.|$)")


class UnaccountedTensors(ValueError):
    """Input tensors that the plan neither merges, copies nor renumbers, and that no user rule drops."""

    def __init__(self, message: str, tensors: dict[str, list[str]]):
        super().__init__(message)
        self.tensors = tensors        # input label → its unaccounted tensor names


@dataclass(frozen=True)
class DropRule:
    """A rule the user wrote that leaves tensors out: `description` names it (for the manifest and
    messages), `drops(label, name)` says whether it drops that input's tensor."""
    description: str
    drops: Callable[[str, str], bool]


def family(name: str) -> str:
    """The tensor's name with its indices as N (model.layers.N.linear_attn.A_log): how tensors are grouped
    in messages."""
    return _INDEX.sub(".N", name)


def account(inputs: Mapping[str, Iterable[str]], outputs: Mapping[str, Mapping[str, str | Sequence[str]]],
            rules: Sequence[DropRule] = (), hint: str = "merge models that have the same tensors",
            moved: Iterable[str] = ()) -> dict:
    """The fate of every input tensor; raises UnaccountedTensors for tensors that have none.

    `inputs`: input label → its tensor names; `outputs`: output tensor name → {input label: the input's
    tensor name it is made from, or a tuple of names} ({} for a tensor made from nothing, e.g. a fresh
    router); `moved`: outputs that only stack their sources (a fused expert tensor: renumbered, not merged,
    whatever their number); `rules`: the
    user's rules that drop tensors; `hint`: what the refusal suggests. Returns {"counts": {fate: n}, "per_input": {label: {fate: n}},
    "dropped_by": {rule: n}} (JSON-ready, for the manifest)."""
    feeds: dict[tuple[str, str], str] = {}
    moved = set(moved)
    for output, sources in outputs.items():
        pairs = [(label, name) for label, names in sources.items()
                 for name in ((names,) if isinstance(names, str) else names)]
        for label, name in pairs:
            fate = ("renumbered" if output in moved else "merged" if len(pairs) > 1
                    else "copied" if name == output else "renumbered")
            previous = feeds.get((label, name))
            if previous is None or FATES.index(fate) < FATES.index(previous):
                feeds[(label, name)] = fate
    counts = dict.fromkeys(FATES, 0)
    per_input: dict[str, dict[str, int]] = {}
    dropped_by: dict[str, int] = {}
    missing: dict[str, list[str]] = {}
    for label, names in inputs.items():
        tally = per_input.setdefault(label, dict.fromkeys(FATES, 0))
        for name in names:
            fate = feeds.get((label, name))
            if fate is None:
                rule = next((r for r in rules if r.drops(label, name)), None)
                if rule is None:
                    missing.setdefault(label, []).append(name)
                    continue
                fate = "dropped"
                dropped_by[rule.description] = dropped_by.get(rule.description, 0) + 1
            tally[fate] += 1
            counts[fate] += 1
    if missing:
        raise UnaccountedTensors(_message(missing, hint), missing)
    return {"counts": counts, "per_input": per_input, "dropped_by": dropped_by}


def _message(missing: dict[str, list[str]], hint: str) -> str:
    total = sum(len(names) for names in missing.values())
    parts = []
    for label, names in missing.items():
        families = list(dict.fromkeys(family(n) for n in names))
        shown = ", ".join(repr(f) for f in families[:4]) + (f" and {len(families) - 4} more" if len(families) > 4 else "")
        parts.append(f"{len(names)} of {label} ({shown})")
    return (f"{total} input tensor{'s' if total != 1 else ''} would be missing from the output: " + "; ".join(parts)
            + ". They are neither merged, copied nor renumbered, and no rule you wrote drops them; refusing to "
              f"write a model without them ({hint})")
