"""Sweeps: declared in YAML (configs/sweeps/), expanded into settings with stable ids, checked by the entry
script's own parser, run by a local pool / submitit (SLURM) / Ray, resumed from per-setting records.

Names are imported lazily so that ``python -m utils.sweeps.entry`` (the process of every setting) starts
without pydantic and the launchers."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Plan": "driver", "RunOptions": "driver", "plan": "driver", "run": "driver", "status_text": "driver",
    "SweepInterrupted": "driver",
    "SlurmOptions": "launchers",
    "Setting": "spec", "SweepError": "spec", "SweepSpec": "spec", "expand": "spec", "load_spec": "spec", "setting_id": "spec",
    "parse_overrides": "spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'utils.sweeps' has no attribute '{name}'")
    return getattr(importlib.import_module(f"utils.sweeps.{_EXPORTS[name]}"), name)
