"""Random draws that depend only on (seed, model index, tensor name, position in the tensor).

Uniform draws for a tensor are made in fixed segments of SEGMENT flat elements, each from its own
CPU generator seeded by sha256(seed, model index, tensor name, segment index). So the same seed gives
the same mask on every device, in any tensor order, with any thread count, and whether a run holds
whole tensors or streams them in segment-aligned pieces.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

SEGMENT = 1 << 20


def derive_seed(seed: int, model_index: int, tensor_name: str, segment: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}\x00{model_index}\x00{tensor_name}\x00{segment}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, model_index: int, tensor_name: str, segment: int = 0) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(seed, model_index, tensor_name, segment))
    return generator


@dataclass(frozen=True)
class RandomSlot:
    """Where a piece of a tensor sits: flat elements [start, start + n) of a tensor of `total` elements."""

    seed: int
    model_index: int
    name: str
    start: int = 0
    total: int | None = None

    def uniform(self, count: int) -> torch.Tensor:
        """U[0, 1) draws for flat positions [start, start + count), float32, on the CPU."""
        total = self.total if self.total is not None else self.start + count
        stop = self.start + count
        out = torch.empty(count, dtype=torch.float32)
        for segment in range(self.start // SEGMENT, (stop - 1) // SEGMENT + 1 if count else 0):
            first = segment * SEGMENT
            length = min(SEGMENT, total - first)
            lo, hi = max(self.start, first), min(stop, first + length)
            generator = make_generator(self.seed, self.model_index, self.name, segment)
            if lo == first and hi == first + length:
                torch.rand(length, generator=generator, out=out[lo - self.start:hi - self.start])
            else:
                out[lo - self.start:hi - self.start] = torch.rand(length, generator=generator)[lo - first:hi - first]
        return out
