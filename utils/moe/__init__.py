"""Mixture of experts from dense models (mergekit-moe's configs): schema, layouts, routers, streaming build."""
from .build import MoEError, MoEJob, run_moe_build
from .config import MoEConfig, MoEConfigError, load_moe_config, parse_moe_config
from .layouts import LAYOUTS

__all__ = ["LAYOUTS", "MoEConfig", "MoEConfigError", "MoEError", "MoEJob", "load_moe_config", "parse_moe_config",
           "run_moe_build"]
