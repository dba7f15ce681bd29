"""Sweeps: declared in YAML (configs/sweeps/), expanded into settings with stable ids, checked by the entry
script's own parser, run by a local pool / submitit (SLURM) / Ray, resumed from per-setting records."""
from utils.sweeps.driver import Plan, RunOptions, plan, run, status_text
from utils.sweeps.launchers import SlurmOptions
from utils.sweeps.spec import Setting, SweepError, SweepSpec, expand, load_spec, setting_id

__all__ = ["Plan", "RunOptions", "Setting", "SlurmOptions", "SweepError", "SweepSpec", "expand", "load_spec", "plan",
           "run", "setting_id", "status_text"]
