"""Random draws that depend only on (seed, model index, tensor name, position in the tensor).

Uniform draws for a tensor are made in fixed segments of SEGMENT flat elements, each from its own
PCG64 generator (NumPy; about 3x faster than torch.rand on CPU) seeded by sha256(seed, model index,
tensor name, segment index). So the same seed gives the same mask on every device, in any tensor
order, with any thread count (segments are filled in parallel threads), and whether a run holds whole
tensors or streams them in pieces.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

SEGMENT = 1 << 20


def derive_seed(seed: int, model_index: int, tensor_name: str, segment: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}\x00{model_index}\x00{tensor_name}\x00{segment}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class RandomSlot:
    """Where a piece of a tensor sits: flat elements [start, start + n) of a tensor of `total` elements."""

    seed: int
    model_index: int
    name: str
    start: int = 0
    total: int | None = None

    def uniform(self, count: int) -> torch.Tensor:
        """U[0, 1) float32 draws (multiples of 2^-24) for flat positions [start, start + count), on the CPU."""
        total = self.total if self.total is not None else self.start + count
        stop = self.start + count
        out = np.empty(count, dtype=np.float32)

        def fill(segment: int) -> None:
            first = segment * SEGMENT
            length = min(SEGMENT, total - first)
            lo, hi = max(self.start, first), min(stop, first + length)
            rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, self.model_index, self.name, segment)))
            if lo == first and hi == first + length:
                rng.random(length, dtype=np.float32, out=out[lo - self.start:hi - self.start])
            else:
                out[lo - self.start:hi - self.start] = rng.random(length, dtype=np.float32)[lo - first:hi - first]

        segments = range(self.start // SEGMENT, (stop - 1) // SEGMENT + 1 if count else 0)
        if len(segments) > 1:
            with ThreadPoolExecutor(max(1, min(len(segments), torch.get_num_threads()))) as pool:
                list(pool.map(fill, segments))
        else:
            for segment in segments:
                fill(segment)
        return torch.from_numpy(out)
