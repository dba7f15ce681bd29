"""Mixture of experts from dense models (mergekit-moe's configs): schema, layouts, routers, streaming build.

Names are imported lazily, so that merge_moe.py checks a config (utils/moe/config.py: pydantic only)
before torch loads."""
from __future__ import annotations

import importlib

_EXPORTS = {"MoEError": "build", "MoEJob": "build", "run_moe_build": "build", "MoEConfig": "config",
            "MoEConfigError": "config", "load_moe_config": "config", "parse_moe_config": "config", "LAYOUTS": "layouts"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'utils.moe' has no attribute '{name}'")
    return getattr(importlib.import_module(f"utils.moe.{_EXPORTS[name]}"), name)
