"""The merging library: pure functions over {tensor_name: tensor} dicts and one method registry."""
from .dare import dare_tensors, dare_model, dare_state_dict, is_excluded
from .merge import check_finite, check_inputs, dare_one_model, merge_state_dicts, resolve_dare
from .options import DareOptions, MergeError, MergeOptions, StateDict
from .randomness import SEGMENT, RandomSlot, derive_seed
from .registry import REGISTRY, MergeMethod, available_methods, get_method
from .selection import kth_smallest, smallest_mask
from .slerp import slerp_tensor
from .sparsify import dare_tensor
from .ties import trim_threshold
from .task_vector import apply_task_vector, task_vector

__all__ = [
    "DareOptions", "MergeError", "RandomSlot", "SEGMENT", "MergeMethod", "MergeOptions", "REGISTRY", "StateDict",
    "apply_task_vector", "available_methods", "check_finite", "check_inputs", "dare_one_model", "dare_tensors", "dare_model", "dare_state_dict",
    "dare_tensor", "derive_seed", "get_method", "is_excluded", "kth_smallest",
    "merge_state_dicts", "resolve_dare", "slerp_tensor", "smallest_mask", "task_vector",
    "trim_threshold",
]
