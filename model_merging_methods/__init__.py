"""The merging library: pure functions over {tensor_name: tensor} dicts and one method registry."""
from .dare import dare_model, dare_one_model, dare_state_dict, dare_tensor, dare_tensors, resolve_dare
from .merge import check_method_inputs, merge_resolved, merge_state_dicts
from .options import DareOptions, MergeError, MergeOptions, ResolvedDare, StateDict
from .randomness import SEGMENT, RandomSlot, derive_seed
from .registry import REGISTRY, MergeMethod, available_methods, get_method
from .selection import kth_smallest, smallest_mask
from .slerp import slerp_tensor
from .task_vector import apply_task_vector, task_vector
from .ties import trim_threshold
from .validation import check_finite, check_inputs, is_excluded

__all__ = [
    "DareOptions", "MergeError", "MergeMethod", "MergeOptions", "REGISTRY", "RandomSlot", "ResolvedDare",
    "SEGMENT", "StateDict", "apply_task_vector", "available_methods", "check_finite", "check_inputs",
    "check_method_inputs", "dare_model", "dare_one_model", "dare_state_dict", "dare_tensor", "dare_tensors",
    "derive_seed", "get_method", "is_excluded", "kth_smallest", "merge_resolved", "merge_state_dicts",
    "resolve_dare", "slerp_tensor", "smallest_mask", "task_vector", "trim_threshold",
]
