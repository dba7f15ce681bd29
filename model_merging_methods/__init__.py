"""The merging library: pure functions over {tensor_name: tensor} dicts and one method registry.

Names are imported on first use (PEP 562): the registry and the option dataclasses load without torch,
so entry scripts can list methods and parse arguments before paying torch's start-up time.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "dare": ("dare_inputs", "dare_model", "dare_one_model", "dare_state_dict", "dare_tensor", "dare_tensors", "resolve_dare"),
    "merge": ("check_dare_base", "check_method_inputs", "merge_resolved", "merge_state_dicts"),
    "options": ("DareOptions", "MergeError", "MergeOptions", "MethodParameter", "ResolvedDare", "StateDict"),
    "norm_adaptive": ("norm_adaptive_weights", "task_vector_norms"),
    "randomness": ("SEGMENT", "RandomSlot", "derive_seed"),
    "registry": ("REGISTRY", "MergeMethod", "available_methods", "get_method", "register"),
    "selection": ("RadixSelect", "count_at_least", "count_below", "high_counts", "kth_largest", "kth_smallest",
                  "kth_smallest_pieces", "low_counts", "select_streamed", "smallest_mask"),
    "recipe_methods": ("slerp_tensor",),
    "task_vector": ("apply_task_vector", "task_vector"),
    "ties": ("trim_rank", "trim_threshold"),
    "validation": ("check_finite", "check_inputs", "is_excluded"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
