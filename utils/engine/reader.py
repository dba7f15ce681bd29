"""Tensor-by-tensor reading of Hugging Face checkpoints (safetensors; `.bin` only when allowed).

Reads use positioned reads into fresh buffers (no memory map), so a process holds only the tensors it
is working on, whatever the model size. `.bin` pickles are refused unless explicitly allowed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.manifest import WEIGHT_SUFFIXES
from utils.precheck import HUB_ID  # noqa: F401 (one home: the entry scripts' pre-checks use it too)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int   # absolute byte offset in the file
    end: int


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _library_check(path: Path) -> None:
    """Let the safetensors library parse and validate the header (it memory-maps, reads nothing else)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as error:
        raise CheckpointError(f"{path}: rejected by the safetensors library ({error})") from error


class SafetensorsFile:
    """One safetensors file: parsed header, validated as the safetensors library does, read tensor by tensor.

    The header is checked here first (messages name the file and the tensor: not a JSON object, an
    entry without dtype / shape / data_offsets, negative or reversed offsets, a span that is not the
    tensor's byte size, tensors that overlap or leave gaps), then ``safetensors.safe_open`` parses and
    validates it again, so nothing the library would refuse is read; the reads themselves stay positioned
    reads into fresh buffers."""

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
        data_start = 8 + header_len
        self.metadata = self._metadata(header)
        self.tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, entry in header.items():
            dtype, shape, begin, end = self._entry(name, entry)
            if data_start + end > size:
                raise CheckpointError(f"{self.path}: truncated safetensors file (tensor {name!r} ends at byte "
                                      f"{data_start + end}, file has {size})")
            spans.append((begin, end, name))
            self.tensors[name] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
        self._check_layout(spans, size - data_start)
        _library_check(self.path)

    def _metadata(self, header) -> dict:
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: safetensors header is a JSON {type(header).__name__}, "
                                  f"not an object of tensor entries")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{self.path}: __metadata__ must map strings to strings")
        return metadata

    def _entry(self, name: str, entry) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError(f"{where}: header entry must have dtype, shape and data_offsets, got {entry!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {dtype}")
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets):
            raise CheckpointError(f"{where}: data_offsets must be two non-negative integers, got {offsets!r}")
        begin, end = offsets
        if end < begin:
            raise CheckpointError(f"{where}: data_offsets {offsets} are reversed")
        itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
        nbytes = math.prod(shape) * itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{where}: data_offsets {offsets} span {end - begin} bytes but a {dtype} tensor "
                                  f"of shape {shape} has {nbytes}")
        return SAFETENSORS_DTYPES[dtype], tuple(shape), begin, end

    def _check_layout(self, spans: list[tuple[int, int, str]], data_size: int) -> None:
        """Tensors tile the data section exactly, as the library requires: sorted by offset, each begins
        where the previous one ends (no overlap, no gap, no bytes of one tensor read as another)."""
        position, previous = 0, None
        for begin, end, name in sorted(spans):
            if begin < position:
                raise CheckpointError(f"{self.path}: tensor {name!r} (bytes {begin}..{end}) overlaps tensor "
                                      f"{previous!r} (ends at {position})")
            if begin > position:
                raise CheckpointError(f"{self.path}: tensor {name!r} starts at byte {begin}, leaving a gap of "
                                      f"{begin - position} bytes after {repr(previous) if previous else 'the header'}")
            position, previous = end, name
        if position != data_size:
            raise CheckpointError(f"{self.path}: the tensors cover {position} bytes of a {data_size}-byte data "
                                  f"section")

    def read(self, name: str, start: int | None = None, stop: int | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor, or flat elements [start, stop) of it as a 1-D tensor; read into the uint8
        buffer `out` when it is given and large enough (a caller's scratch: the result is a view of it)."""
        info = self.tensors[name]
        itemsize = torch.empty((), dtype=info.dtype).element_size()
        first = info.start + (start or 0) * itemsize
        last = info.end if stop is None else info.start + stop * itemsize
        fits = out is not None and out.dtype == torch.uint8 and out.is_contiguous() and out.numel() >= last - first
        buffer = out[:last - first] if fits else torch.empty(last - first, dtype=torch.uint8)
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
        weight_map = _read_weight_map(index_path) if index_path.exists() else None
        if weight_map is not None:
            paths = [self.folder / f for f in dict.fromkeys(weight_map.values())]
            for path in paths:
                if not path.is_file():
                    raise CheckpointError(f"{index_path}: shard {path.name} is missing")
        for path in paths:
            shard = SafetensorsFile(path)
            for name in shard.tensors:
                if name in self._files:
                    raise CheckpointError(f"{self.folder}: tensor {name!r} is in both {self._files[name].path.name} "
                                          f"and {path.name}")
                if weight_map is not None and weight_map.get(name) != path.name:
                    raise CheckpointError(f"{index_path}: tensor {name!r} of {path.name} is mapped to "
                                          f"{weight_map.get(name)!r}")
                self._files[name] = shard
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._files))
            if missing:
                raise CheckpointError(f"{index_path}: tensor {missing[0]!r} is mapped to {weight_map[missing[0]]} "
                                      f"but that shard does not hold it")

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

    def get(self, name: str, start: int | None = None, stop: int | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor, or flat elements [start, stop) of it as a 1-D tensor (`out`: see
        SafetensorsFile.read; a view of it is returned, so only for reads that do not escape)."""
        if name in self._files:
            return self._files[name].read(name, start, stop, out)
        tensor = self._loaded[self._pickled[name]][name]
        if start is None and stop is None:
            return tensor.clone()
        return tensor.reshape(-1)[start:stop].clone()

    def describe_files(self) -> list[dict]:
        """Name, size and sha256 of the safetensors header of every weight file. The header names only
        tensor names, dtypes, shapes and offsets: it tells layouts apart, not weights (a base and its
        fine-tunes share it); merge manifests record the file's sha256 (file_sha256) instead."""
        shards = {id(f): f for f in self._files.values()}.values()
        described = [{"file": f.path.name, "bytes": f.path.stat().st_size,
                      "header_sha256": hashlib.sha256(f.header_bytes).hexdigest()} for f in shards]
        described += [{"file": p.name, "bytes": p.stat().st_size, "header_sha256": None} for p in self._loaded]
        return described

    def weight_files(self) -> list[Path]:
        """Every weight file the tensors are read from, in a fixed order."""
        shards = {f.path: None for f in self._files.values()}
        return sorted(shards) + sorted(self._loaded)


def _read_weight_map(index_path: Path) -> dict[str, str]:
    """The index's weight_map (tensor → shard file name in the same folder), checked."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{index_path}: not valid JSON ({error})") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no weight_map (an object mapping tensor names to shard files)")
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
            raise CheckpointError(f"{index_path}: tensor {name!r} maps to {file!r}, not a .safetensors file "
                                  f"name in the folder")
    return weight_map


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


def open_checkpoint(source: str, allow_pickle: bool = False):
    """(folder, reader) of a model source: a checkpoint folder or hub id (CheckpointReader), or mergekit's
    ``base+adapter``: the base's folder and a reader that folds the PEFT LoRA adapter in per tensor."""
    from utils.lora.adapter import split_adapter_source

    base_source, adapter_source = split_adapter_source(source)
    folder = resolve_checkpoint(base_source, allow_pickle)
    reader = CheckpointReader(folder, allow_pickle)
    if adapter_source is None:
        return folder, reader
    return folder, adapted_reader(reader, folder, base_source, adapter_source, allow_pickle)


def adapted_reader(reader: CheckpointReader, folder: Path, base_source: str, adapter_source: str,
                   allow_pickle: bool = False):
    """`reader` with the PEFT LoRA adapter `adapter_source` (folder or hub id) folded in per tensor
    (utils.lora.fold.AdaptedReader: the same interface; W + scale·B·A for adapted tensors, PEFT's
    merge_and_unload() values). Raises AdapterError (a CheckpointError) for an adapter that does not fit."""
    from utils.lora.adapter import LoraAdapter, resolve_adapter
    from utils.lora.fold import AdaptedReader

    adapter = LoraAdapter(resolve_adapter(adapter_source), adapter_source, allow_pickle)
    return AdaptedReader(reader, folder, base_source, adapter)
