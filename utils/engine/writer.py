"""Streaming sharded safetensors writer: tensors go to disk in a planned order as they are produced."""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from model_merging_methods import MergeError

from .reader import DTYPE_CODES


class NonFiniteOutputError(MergeError):
    """An output tensor holds NaN or Inf although no input did: a parameter made the merge divide by zero
    or overflow. Nothing is published (the writer's last line of defence; the parameters' own checks come first)."""


def has_nonfinite(tensor: torch.Tensor) -> bool:
    """True when a floating-point tensor holds a NaN or ±Inf: its minimum and maximum (one pass, no scratch
    mask; 30x faster than an isfinite mask) are finite exactly when every entry is, since min and max
    propagate NaN and ±Inf is an extreme."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return False
    flat = (torch.view_as_real(tensor) if tensor.is_complex() else tensor).reshape(-1)
    if not flat.numel():
        return False
    low, high = torch.aminmax(flat)
    return not (math.isfinite(float(low)) and math.isfinite(float(high)))


class InputFiniteness:
    """Whether the inputs of a merge hold NaN/Inf, asked by the writer only when an output tensor does (so a
    normal run reads nothing more). A tensor of the same name is looked at first, then, if none of those
    is non-finite, every tensor of every input once (an output may come from other names: layer stacking,
    MoE experts), so a NaN that an input already had is published as the input had it."""

    def __init__(self, readers: Sequence) -> None:
        self.readers = list(readers)
        self._any: bool | None = None

    def had_nonfinite(self, name: str) -> bool:
        for reader in self.readers:
            if name in set(reader.names()) and has_nonfinite(reader.get(name)):
                return True
        if self._any is None:
            self._any = any(has_nonfinite(reader.get(other)) for reader in self.readers for other in reader.names())
        return self._any


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class ShardedSafetensorsWriter:
    """Writes tensors, in a fixed planned order, straight into sharded safetensors files.

    Every shard's header is computed up front from the plan, so each tensor goes to disk as soon as it
    is produced and nothing accumulates in memory.
    """

    def __init__(self, folder: Path, plan: list[PlannedTensor], max_shard_size: int, *, inputs: Sequence | None):
        """`inputs`: the readers of the merge's input models (None: no inputs, so any NaN/Inf is refused).
        A tensor holding NaN/Inf is written only if an input held NaN/Inf too (see InputFiniteness);
        otherwise NonFiniteOutputError names it and the run publishes nothing."""
        self.finiteness = InputFiniteness(inputs or [])
        self.folder = Path(folder)
        self.shards = self._split(plan, max_shard_size)
        count = len(self.shards)
        self.shard_names = (["model.safetensors"] if count == 1 else
                            [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self._queue = [(shard_index, tensor) for shard_index, shard in enumerate(self.shards) for tensor in shard]
        self._position = 0
        self._written = 0  # bytes of the current tensor written so far
        self._handle = None
        self._open_shard = -1

    @staticmethod
    def _split(plan: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
        shards, current, size = [], [], 0
        for tensor in plan:
            if current and size + tensor.nbytes > max_shard_size:
                shards.append(current)
                current, size = [], 0
            current.append(tensor)
            size += tensor.nbytes
        return shards + [current] if current or not shards else shards

    def write(self, name: str, tensor: torch.Tensor, part: bool = False) -> None:
        """Write a whole planned tensor, or (part=True) its next flat piece."""
        shard_index, planned = self._queue[self._position]
        whole_ok = part or tuple(tensor.shape) == planned.shape
        if name != planned.name or tensor.dtype != planned.dtype or not whole_ok:
            raise RuntimeError(f"writer expected {planned} but got {name} {tensor.dtype} {tuple(tensor.shape)}")
        if has_nonfinite(tensor) and not self.finiteness.had_nonfinite(name):
            raise NonFiniteOutputError(
                f"output tensor {name!r} holds NaN or Inf values that no input had (a weight, scale or density "
                f"that divides by zero or overflows?); nothing was published")
        if shard_index != self._open_shard:
            self._start_shard(shard_index)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self._written += data.nbytes
        if self._written > planned.nbytes:
            raise RuntimeError(f"writer got {self._written} bytes for {planned}")
        if self._written == planned.nbytes:
            self._position += 1
            self._written = 0

    def _start_shard(self, shard_index: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for tensor in self.shards[shard_index]:
            header[tensor.name] = {"dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._handle = open(self.folder / self.shard_names[shard_index], "wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._open_shard = shard_index

    def finish(self) -> list[str]:
        """Closes the last shard, writes the index for sharded output, returns the file names."""
        if self._position != len(self._queue):
            raise RuntimeError(f"writer finished after {self._position} of {len(self._queue)} tensors")
        if self._handle is not None:
            self._handle.close()
        elif self._queue == []:
            self._start_shard(0)
            self._handle.close()
        if len(self.shards) > 1:
            weight_map = {t.name: self.shard_names[i] for i, shard in enumerate(self.shards) for t in shard}
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            return self.shard_names + ["model.safetensors.index.json"]
        return self.shard_names
