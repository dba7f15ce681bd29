"""Random draws that depend only on (seed, model index, tensor name, position in the tensor).

Uniform draws for a tensor are made in fixed segments of SEGMENT flat elements, each from its own
PCG64 generator (NumPy; about 3x faster than torch.rand on CPU) seeded by sha256(seed, model index,
tensor name, segment index). So the same seed gives the same mask on every device, in any tensor
order, with any thread count (segments are filled in parallel threads), and whether a run holds whole
tensors or streams them in pieces.
"""
from __future__ import annotations

import hashlib
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

SEGMENT = 1 << 20


def derive_seed(seed: int, model_index: int, tensor_name: str, segment: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}\x00{model_index}\x00{tensor_name}\x00{segment}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draws_below(draws: torch.Tensor, bound: float) -> np.ndarray:
    """[u < bound] for float32 draws u, as torch compares them (the bound rounded to float32), in NumPy."""
    return np.less(draws.numpy(), np.float32(bound))


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
        out = np.empty(count, dtype=np.float32)

        def fill(bits: np.random.PCG64, into: slice, lo: int, hi: int, length: int) -> None:
            rng = np.random.Generator(bits)
            if lo == 0 and hi == length:
                rng.random(length, dtype=np.float32, out=out[into])
            else:
                out[into] = rng.random(length, dtype=np.float32)[lo:hi]

        self._by_segment(count, fill)
        return torch.from_numpy(out)

    def below(self, count: int, bound: float) -> np.ndarray:
        """[u < bound] (flat bool) for the draws u that uniform(count) gives, compared as torch compares them
        (float32 draws against the bound rounded to float32), without forming the floats: NumPy's float32 draw
        is u = (b >> 8)·2^-24 for the generator's next 32 bits b (the low, then the high half of each 64-bit
        output), so u < β ⇔ b < ⌈β·2^24⌉·2^8 — 2–3× faster than drawing and comparing floats, the same bits."""
        beta = float(np.float32(bound))
        if not beta > 0 or beta > 1 or sys.byteorder != "little":   # (big-endian: the halves swap)
            return draws_below(self.uniform(count), bound)
        out = np.empty(count, dtype=bool)
        threshold = np.uint32(math.ceil(beta * 2**24) << 8) if beta < 1 else None

        def fill(bits: np.random.PCG64, into: slice, lo: int, hi: int, length: int) -> None:
            if threshold is None:
                out[into] = True
                return
            raw = bits.random_raw((hi + 1) // 2).view(np.uint32)
            np.less(raw[lo:hi], threshold, out=out[into])

        self._by_segment(count, fill)
        return out

    def _by_segment(self, count: int, fill: Callable[[np.random.PCG64, slice, int, int, int], None]) -> None:
        """fill(generator of segment s, output slice, lo, hi, length) for every segment s the positions
        [start, start + count) touch: positions [lo, hi) of the segment's `length` draws; segments in parallel
        threads."""
        total = self.total if self.total is not None else self.start + count
        stop = self.start + count

        def one(segment: int) -> None:
            first = segment * SEGMENT
            length = min(SEGMENT, total - first)
            lo, hi = max(self.start, first), min(stop, first + length)
            bits = np.random.PCG64(derive_seed(self.seed, self.model_index, self.name, segment))
            fill(bits, slice(lo - self.start, hi - self.start), lo - first, hi - first, length)

        segments = range(self.start // SEGMENT, (stop - 1) // SEGMENT + 1 if count else 0)
        if len(segments) > 1:
            with ThreadPoolExecutor(max(1, min(len(segments), torch.get_num_threads()))) as pool:
                list(pool.map(one, segments))
        else:
            for segment in segments:
                one(segment)
