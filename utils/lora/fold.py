"""A checkpoint reader that folds a LoRA adapter into its base per tensor, while streaming.

``AdaptedReader`` has the interface of utils.engine.reader.CheckpointReader (names, info, get with flat
ranges, describe_files, weight_files): every engine that reads a model reads ``base+adapter`` through it,
and no folded copy is ever written. For an adapted tensor it returns PEFT's merge_and_unload() value

    W' = W + transpose(B @ A, fan_in_fan_out) · scaling        (float32, rounded once to W's dtype)

(tied ``lm_head``: the delta goes into the input embedding it shares), ``W + scaling · b_B`` for a
``lora_B.bias``, and the adapter's copy for a tensor it replaces (modules_to_save, trained biases,
saved base_layer weights). Other tensors pass through unchanged.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch

from utils.engine.reader import CheckpointReader

from .adapter import CONV1D_MODEL_TYPES, AdapterError, LoraAdapter, LoraModule, _source_tail, add_delta_rows, delta_weight

# pieces up to this many elements fold in per-thread float32 scratch buffers (a fresh buffer per piece paid
# its page faults again: ~40 % of the fold); larger (whole) tensors get fresh buffers
SCRATCH_MAX = 1 << 22
FACTOR_CACHE = 8   # modules whose float32 factors are kept: a large tensor's pieces re-read them (up to 4 MB each)
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                      "shared.weight", "tok_embeddings.weight")


def _config(folder: Path) -> dict:
    try:
        data = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def tied_embedding(names: list[str], config: dict) -> str | None:
    """The input-embedding tensor that a tied ``lm_head`` shares, when the checkpoint has no lm_head."""
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    if "lm_head.weight" in names or not config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", True)):
        return None
    found = [n for n in names if n.endswith(EMBEDDING_SUFFIXES)]
    return found[0] if len(found) == 1 else None


class AdaptedReader:
    """`base` with `adapter` folded in per tensor (module docstring). Checked on construction: every target
    exists in the base with matching shapes, and the adapter's recorded base names the same model."""

    def __init__(self, base: CheckpointReader, base_folder: Path, base_source: str, adapter: LoraAdapter):
        self.base, self.adapter = base, adapter
        self.folder = Path(base_folder)
        names = base.names()
        present = set(names)
        config = _config(base_folder)
        self._check_base_name(base_source, base_folder)
        tied = tied_embedding(names, config)
        conv1d = config.get("model_type") in CONV1D_MODEL_TYPES
        self.deltas: dict[str, list[LoraModule]] = {}
        self.bias_deltas: dict[str, LoraModule] = {}
        self.replaced: dict[str, str] = {}
        where = f"adapter {adapter.source}"
        for module in adapter.modules.values():
            target = self._target(module.target, present, tied, where, "target module")
            shape = base.info(target)[1]
            module = self._oriented(module, shape, conv1d, where)
            self.deltas.setdefault(target, []).append(module)
            if module.bias_key:
                bias = self._target(module.module + ".bias", present, None, where, "lora_B.bias of")
                self._check_shape(bias, base.info(bias)[1], adapter.shape(module.bias_key), where)
                self.bias_deltas[bias] = module
        for name, key in [*adapter.base_layers.items(), *adapter.full.items()]:
            if name == "lm_head.weight" and tied is not None and "lm_head.weight" not in present:
                if name in adapter.full:
                    raise AdapterError(f"{where}: it replaces lm_head.weight (modules_to_save), but {base_source} "
                                       f"ties lm_head to {tied}; a separate head cannot be folded into one tensor")
            target = self._target(name, present, tied, where, "tensor")
            self._check_shape(target, base.info(target)[1], adapter.shape(key), where)
            self.replaced[target] = key
        for target in self.deltas:   # the embedding before the tied head: the order merge_and_unload adds them in
            self.deltas[target].sort(key=lambda m: m.module.endswith("lm_head"))
        self._local = threading.local()   # each reading thread's scratch buffers
        self._factors: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._factors_lock = threading.Lock()

    def _float_factors(self, module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of `module` in float32 (PEFT's get_delta_weight upcasts them), read once per module while
        its tensor's pieces are folded: every piece of the embedding read all of A (and of lm_head all of B)."""
        with self._factors_lock:
            if module.module in self._factors:
                self._factors.move_to_end(module.module)
                return self._factors[module.module]
        a, b = (factor.float() for factor in self.adapter.factors(module))
        with self._factors_lock:
            self._factors[module.module] = (a, b)
            while len(self._factors) > FACTOR_CACHE:
                self._factors.popitem(last=False)
        return a, b

    def _scratch(self, slot: int, rows: int, columns: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """This thread's scratch buffer `slot` viewed as rows × columns of `dtype` (None above SCRATCH_MAX)."""
        numel = rows * columns
        if numel > SCRATCH_MAX:
            return None
        buffers = self._local.__dict__.setdefault("buffers", {})
        if slot not in buffers or buffers[slot].numel() < numel or buffers[slot].dtype != dtype:
            buffers[slot] = torch.empty(numel, dtype=dtype)
        return buffers[slot][:numel].view(rows, columns)

    def _check_base_name(self, base_source: str, base_folder: Path) -> None:
        recorded = self.adapter.base_model_name_or_path
        if not recorded:
            return
        if Path(recorded).expanduser().is_dir() and Path(recorded).expanduser().resolve() == Path(base_folder).resolve():
            return
        if _source_tail(recorded) in {_source_tail(base_source), _source_tail(str(base_folder))}:
            return
        raise AdapterError(f"adapter {self.adapter.source} was trained on {recorded!r} (adapter_config.json "
                           f"base_model_name_or_path), not on {base_source}; if {base_source} is a copy of that "
                           f"model, set base_model_name_or_path to it")

    @staticmethod
    def _target(name: str, present: set[str], tied: str | None, where: str, what: str) -> str:
        if name in present:
            return name
        if name == "lm_head.weight" and tied is not None:
            return tied
        raise AdapterError(f"{where}: {what} {name.removesuffix('.weight')!r} is absent from the base checkpoint")

    @staticmethod
    def _check_shape(name: str, base_shape: tuple, shape: tuple, where: str) -> None:
        if tuple(base_shape) != tuple(shape):
            raise AdapterError(f"{where}: tensor {name!r} is {list(shape)} in the adapter but {list(base_shape)} "
                               f"in the base (another base model?)")

    def _oriented(self, module: LoraModule, shape: tuple, conv1d: bool, where: str) -> LoraModule:
        """The module with `transpose` set as PEFT sets it for the layer's type: Embedding and Conv1D
        (weight in × out) fold (B @ A)ᵀ, Linear folds B @ A, whatever fan_in_fan_out says (PEFT corrects
        it with a warning); a square weight is Conv1D only in Conv1D model families."""
        a_shape, b_shape = self.adapter.shape(module.a_key), self.adapter.shape(module.b_key)
        product = (b_shape[0], a_shape[1])
        if len(shape) != 2:
            raise AdapterError(f"{where}: module {module.module!r} adapts a {len(shape)}-D tensor {list(shape)}")
        if module.embedding:
            transpose = True
        elif product[0] == product[1]:
            transpose = conv1d and not module.module.endswith(("lm_head", "score"))
        else:
            transpose = tuple(shape) == product[::-1]
        expected = product[::-1] if transpose else product
        if tuple(shape) != expected:
            raise AdapterError(f"{where}: module {module.module!r}: B @ A is {list(product)} (rank {module.rank}) "
                               f"but the base weight is {list(shape)} (another base model?)")
        return replace(module, transpose=transpose)

    # --- the CheckpointReader interface -------------------------------------------------------------
    def names(self) -> list[str]:
        return self.base.names()

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.base.info(name)

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The folded tensor, or flat elements [start, stop) of it (1-D), as CheckpointReader.get."""
        if name in self.replaced:
            dtype, shape = self.base.info(name)
            value = self.adapter.read(self.replaced[name]).to(dtype)
            if name in self.deltas:   # an embedding PEFT saved with its adapter: the copy is the base here
                value = self._fold(value, name, 0, shape[0])
            return value if start is None and stop is None else value.reshape(-1)[start:stop].clone()
        if name in self.bias_deltas:
            module = self.bias_deltas[name]
            bias = self.base.get(name)
            value = (bias.float() + self.adapter.read(module.bias_key).float() * module.scaling).to(bias.dtype)
            return value if start is None and stop is None else value.reshape(-1)[start:stop].clone()
        if name not in self.deltas:
            return self.base.get(name, start, stop)
        shape = self.base.info(name)[1]
        if start is None and stop is None:
            return self._fold(self.base.get(name), name, 0, shape[0])
        columns = shape[1]
        first, last = start // columns, -(-stop // columns)
        # the base rows only feed the fold (copied into float32 there): read into this thread's byte scratch
        # rather than a fresh buffer (its page faults cost as much as the read)
        into = self._scratch(2, (last - first) * self.base.info(name)[0].itemsize, columns, torch.uint8)
        rows = self.base.get(name, first * columns, last * columns,
                             out=None if into is None else into.view(-1)).reshape(last - first, columns)
        folded = self._fold(rows, name, first, last, whole=False).reshape(-1)
        offset = first * columns
        if start == offset and stop - offset == folded.numel():   # a row-aligned piece: the fold is the piece
            return folded
        return folded[start - offset:stop - offset].clone()

    def _fold(self, weight: torch.Tensor, name: str, first: int, last: int, whole: bool = True) -> torch.Tensor:
        modules = self.deltas[name]
        value = weight
        for module in modules:
            a, b = self._float_factors(module)
            if whole:
                # Δ + W in float32, in Δ's buffer: the bits of merge_and_unload's float(W) + Δ (IEEE addition
                # commutes)
                value = delta_weight(a, b, module.scaling, module.transpose).add_(value)
            else:
                rows, columns = value.shape
                # float(W) in scratch first (a mixed-dtype add costs 4× more); with a second module on a float32
                # tensor, W may be the first module's result buffer, so it is copied before that is reused
                wide = self._scratch(1, rows, columns)
                wide = value.to(torch.float32, copy=True) if wide is None else wide.copy_(value)
                value = add_delta_rows(wide, a, b, module.scaling, module.transpose, first, last,
                                       scratch=self._scratch(0, rows, columns))
            if len(modules) > 1:   # merge_and_unload rounds after each module (tied embeddings)
                value = value.to(weight.dtype)
        # a fresh, contiguous tensor in W's dtype ((B @ A)ᵀ of embeddings is a transposed view, and scratch
        # buffers are reused by the thread's next piece)
        return torch.empty(value.shape, dtype=weight.dtype).copy_(value)

    def describe_files(self) -> list[dict]:
        described = self.base.describe_files()
        path = self.adapter.file.path
        described.append({"file": f"adapter:{path.name}", "bytes": path.stat().st_size,
                          "header_sha256": hashlib.sha256(self.adapter.file.header_bytes).hexdigest()})
        return described

    def weight_files(self) -> list[Path]:
        return self.base.weight_files() + [self.adapter.file.path]
