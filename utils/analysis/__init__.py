"""Task-vector analysis (statistics, layer grouping, pairwise cosine) and the norms of norm-adaptive merging.

Names are loaded on first use (torch is imported only then), so importing ``utils.analysis.defaults`` for a
command line stays fast."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "analyze": ("COMPUTE_DTYPES", "AnalysisOptions", "analyze", "run_analysis"),
    "defaults": ("COMPUTE_DTYPE_NAMES", "DEFAULT_QUANTILES"),
    "grouping": ("KINDS", "NO_LAYER", "LayerGrouping", "kind_of"),
    "norms": ("norms_from_analysis", "stream_task_vector_norms"),
    "statistics": ("AnalysisError", "exact_quantiles", "tensor_statistics"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
