"""Tensor-by-tensor reading of Hugging Face checkpoints (safetensors; `.bin` only when allowed).

Reads use positioned reads into fresh buffers (no memory map), so a process holds only the tensors it
is working on, whatever the model size. `.bin` pickles are refused unless explicitly allowed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int   # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One safetensors file: parsed header, checked against the file size, read tensor by tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            header_len = struct.unpack("<Q", prefix)[0]
            if header_len > size - 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (header of {header_len} "
                                      f"bytes, file has {size})")
            self.header_bytes = handle.read(header_len)
        try:
            header = json.loads(self.header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{self.path}: unreadable safetensors header ({error})") from error
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
            begin, end = entry["data_offsets"]
            if data_start + end > size:
                raise CheckpointError(f"{self.path}: truncated safetensors file (tensor {name!r} ends at byte "
                                      f"{data_start + end}, file has {size})")
            self.tensors[name] = TensorInfo(SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                            data_start + begin, data_start + end)

    @property
    def header_sha256(self) -> str:
        return hashlib.sha256(self.header_bytes).hexdigest()

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The whole tensor, or flat elements [start, stop) of it as a 1-D tensor."""
        info = self.tensors[name]
        itemsize = torch.empty((), dtype=info.dtype).element_size()
        first = info.start + (start or 0) * itemsize
        last = info.end if stop is None else info.start + stop * itemsize
        buffer = torch.empty(last - first, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):
                count = os.preadv(fd, [view[done:]], first + done)
                if count == 0:
                    raise CheckpointError(f"{self.path}: unexpected end of file reading {name!r}")
                done += count
        finally:
            os.close(fd)
        tensor = buffer.view(info.dtype)
        return tensor if start is not None or stop is not None else tensor.reshape(info.shape)


class CheckpointReader:
    """All tensors of a checkpoint folder (single or sharded safetensors; `.bin` only if allowed)."""

    def __init__(self, folder: Path, allow_pickle: bool = False):
        self.folder = Path(folder)
        self._files: dict[str, SafetensorsFile] = {}
        self._pickled: dict[str, Path] = {}
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        safetensors = sorted(self.folder.glob("*.safetensors"))
        pickles = sorted(self.folder.glob("pytorch_model*.bin"))
        if safetensors:
            self._index_safetensors(safetensors)
        elif pickles and not allow_pickle:
            raise CheckpointError(f"{self.folder}: only pickled .bin weights found; they can run code when "
                                  f"loaded. Convert them to safetensors, or pass --allow_pickle "
                                  f"(loads with torch.load(weights_only=True))")
        elif pickles:
            self._index_pickles(pickles)
        else:
            raise CheckpointError(f"{self.folder}: no model weights (*.safetensors) found")

    def _index_safetensors(self, paths: list[Path]) -> None:
        index_path = self.folder / "model.safetensors.index.json"
        if index_path.exists():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            paths = [self.folder / f for f in dict.fromkeys(weight_map.values())]
            for path in paths:
                if not path.exists():
                    raise CheckpointError(f"{index_path}: shard {path.name} is missing")
        for path in paths:
            shard = SafetensorsFile(path)
            for name in shard.tensors:
                self._files[name] = shard

    def _index_pickles(self, paths: list[Path]) -> None:
        for path in paths:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for name in state:
                self._pickled[name] = path
            self._loaded[path] = state

    def names(self) -> list[str]:
        return list(self._files) + list(self._pickled)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if name in self._files:
            entry = self._files[name].tensors[name]
            return entry.dtype, entry.shape
        tensor = self._loaded[self._pickled[name]][name]
        return tensor.dtype, tuple(tensor.shape)

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The whole tensor, or flat elements [start, stop) of it as a 1-D tensor."""
        if name in self._files:
            return self._files[name].read(name, start, stop)
        tensor = self._loaded[self._pickled[name]][name]
        if start is None and stop is None:
            return tensor.clone()
        return tensor.reshape(-1)[start:stop].clone()

    def describe_files(self) -> list[dict]:
        """Name, size and sha256 of the header of every weight file (for the merge manifest)."""
        shards = {id(f): f for f in self._files.values()}.values()
        described = [{"file": f.path.name, "bytes": f.path.stat().st_size, "header_sha256": f.header_sha256}
                     for f in shards]
        described += [{"file": p.name, "bytes": p.stat().st_size, "header_sha256": None} for p in self._loaded]
        return described


def resolve_checkpoint(name_or_path: str, allow_pickle: bool = False) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id, downloaded (or found in the HF cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{name_or_path}: expected a checkpoint folder, found a file")
    if not HUB_ID.match(name_or_path) or name_or_path.startswith("."):
        raise CheckpointError(f"{name_or_path}: no such checkpoint folder")
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.py"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, allow_patterns=patterns))
    except Exception as error:  # network, auth, unknown repo: report them all the same way
        raise CheckpointError(f"{name_or_path}: not a local folder, and fetching it from the Hugging Face "
                              f"hub failed ({type(error).__name__}: {error})") from error
