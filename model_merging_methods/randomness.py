"""Per-tensor random generators: a draw depends only on (seed, model index, tensor name).

Masks are always drawn on the CPU so that the same seed gives the same mask on every device, in any
tensor order, with any thread count, and whether a run streams one tensor or holds the whole model.
"""
from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, model_index: int, tensor_name: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{model_index}\x00{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, model_index: int, tensor_name: str) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(seed, model_index, tensor_name))
    return generator
