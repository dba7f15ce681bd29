"""PEFT LoRA adapter folders, read and checked against the base checkpoint they go on.

An adapter folder is what ``PeftModel.save_pretrained`` writes: ``adapter_config.json`` (see below for how
it is read) and ``adapter_model.safetensors`` whose keys are ``base_model.model.<module>.<part>``:

- ``lora_A.weight`` (r × in) and ``lora_B.weight`` (out × r) of a Linear / Conv1D module;
- ``lora_embedding_A`` (r × num_embeddings) and ``lora_embedding_B`` (dim × r) of an Embedding;
- ``lora_B.bias`` (``lora_bias=True``): added to the module's bias, times the scaling;
- anything else is a full tensor that replaces the base's: ``modules_to_save`` copies (norms, heads),
  trained biases (``bias="all"`` / ``"lora_only"``), and the ``base_layer`` weights PEFT saves with
  embedding adapters (``save_embedding_layers``); ``original_module`` copies are PEFT's untouched
  originals and are skipped.

The delta of a module is PEFT's ``get_delta_weight``: ``transpose(B @ A, fan_in_fan_out) · scaling`` in
float32, ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), r and alpha per module from
``rank_pattern`` / ``alpha_pattern`` as PEFT matches them. Embedding deltas are transposed the same way.

Folding reads the few config fields it needs (``lora_alpha``, ``use_rslora``, ``alpha_pattern``,
``fan_in_fan_out``) straight from the JSON, with PEFT's defaults: ``import peft`` pulls in transformers and
costs ~5 s, more than folding a 0.84B model's adapter. PEFT's own ``LoraConfig`` (``LoraAdapter.config``) is
built only where a PEFT adapter is written (adapter-space merging); tests check the defaults and the pattern
rule against PEFT's.
"""
from __future__ import annotations

import json
import math
import numbers
import re
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from utils.engine.reader import HUB_ID, CheckpointError, SafetensorsFile

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# model types whose linear layers are transformers' Conv1D (weight stored in × out): PEFT forces
# fan_in_fan_out=True on them whatever the config says
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
FACTOR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                    r"lora_embedding_B|lora_magnitude_vector(\.weight)?)$")
# config fields that change what an adapter computes and that folding W + s·B·A would silently ignore
UNSUPPORTED = {"use_dora": "DoRA (use_dora: true) rescales each weight column by a learned magnitude",
               "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
               "trainable_token_indices": "trainable tokens (trainable_token_indices)",
               "layer_replication": "layer replication (layer_replication)",
               "use_qalora": "QA-LoRA (use_qalora)", "use_bdlora": "block-diagonal LoRA (use_bdlora)",
               "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)"}
# peft.LoraConfig's defaults of the fields folding reads (tests/test_lora_fold.py checks them against PEFT's)
FOLD_DEFAULTS = {"lora_alpha": 8, "use_rslora": False, "alpha_pattern": {}, "fan_in_fan_out": False}


class AdapterError(CheckpointError):
    """An adapter that cannot be folded into / merged for this base: the message names the file and key."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its factors' keys in the adapter file and how its delta is formed."""
    module: str               # module path, as in the base checkpoint's tensor names
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scaling: float
    transpose: bool           # fan_in_fan_out (Conv1D) or embedding: the delta is (B @ A)ᵀ
    embedding: bool
    bias_key: str | None = None   # lora_B.bias (lora_bias=True)

    @property
    def target(self) -> str:
        return self.module + ".weight"


def split_adapter_source(source: str) -> tuple[str, str | None]:
    """mergekit's ``base+adapter`` syntax → (base, adapter); a plain source (or an existing folder whose
    name holds '+') → (source, None)."""
    if "+" not in source or Path(source).expanduser().is_dir():
        return source, None
    base, _, adapter = source.rpartition("+")
    if not base or not adapter:
        raise AdapterError(f"{source!r}: a LoRA reference is 'base+adapter' (both parts non-empty)")
    return base, adapter


def resolve_adapter(name_or_path: str) -> Path:
    """A local adapter folder as is; otherwise a hub id, fetched (or found in the HF cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise AdapterError(f"{name_or_path}: expected a PEFT adapter folder, found a file")
    if not HUB_ID.match(name_or_path) or name_or_path.startswith("."):
        raise AdapterError(f"{name_or_path}: no such adapter folder")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as error:  # network, auth, unknown repo: reported the same way
        raise AdapterError(f"{name_or_path}: not a local folder, and fetching the adapter from the Hugging "
                           f"Face hub failed ({type(error).__name__})") from None


def _source_tail(text: str) -> str:
    """The last name of a hub id or folder ('models--org--name' cache folders give 'name'), lower-cased."""
    parts = [p for p in str(text).replace("\\", "/").split("/") if p]
    for part in reversed(parts):
        if part.startswith("models--"):
            return part.split("--")[-1].lower()
    return parts[-1].lower() if parts else ""


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def pattern_key(patterns, module: str) -> str:
    """PEFT's rank_pattern / alpha_pattern rule (peft.utils.other.get_pattern_key): the first key, in the
    dict's order, that matches the end of the module path at a '.' boundary as a regular expression
    (``re.match(r"(.*\.)?(key)$", module)``); the module path itself when none does."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


class LoraAdapter:
    """A PEFT LoRA adapter folder, validated against the base it will be folded into or merged on."""

    def __init__(self, folder: Path, source: str | None = None, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.source = source or str(folder)
        self.config_dict = self._read_config()
        weights = self.folder / WEIGHTS_NAME
        if not weights.is_file():
            found = "adapter_model.bin (pickled; convert it to safetensors)" if (self.folder / "adapter_model.bin").is_file() \
                else "no adapter_model.safetensors"
            raise AdapterError(f"{self.folder}: {found}")
        self.file = SafetensorsFile(weights)
        self.modules: dict[str, LoraModule] = {}   # module path → factors
        self.full: dict[str, str] = {}             # base tensor name → trained full copy replacing it
        self.base_layers: dict[str, str] = {}      # base tensor name → PEFT's saved copy of the base weight
        self._index()

    def _read_config(self) -> dict:
        path = self.folder / CONFIG_NAME
        if not path.is_file():
            raise AdapterError(f"{self.folder}: no {CONFIG_NAME} (not a PEFT adapter folder)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise AdapterError(f"{path}: unreadable ({error})") from None
        if not isinstance(data, dict):
            raise AdapterError(f"{path}: not a JSON object")
        kind = data.get("peft_type")
        if kind != "LORA":
            raise AdapterError(f"{path}: peft_type {kind!r} is not supported (only LORA adapters can be folded "
                               f"or merged)")
        for key, what in UNSUPPORTED.items():
            if data.get(key):
                raise AdapterError(f"{path}: {what} is not supported ({key}: {json.dumps(data[key])}); merge it "
                                   f"with PEFT's merge_and_unload() and pass the full checkpoint")
        return data

    def _fold_field(self, name: str):
        """A config field folding reads: PEFT's default when absent (and ``alpha_pattern: null`` as {});
        a wrongly typed value → AdapterError naming the field."""
        default = FOLD_DEFAULTS[name]
        value = self.config_dict.get(name, default)
        if value is None and isinstance(default, dict):
            value = {}
        if isinstance(default, bool):
            ok, wanted = isinstance(value, bool), "true or false"
        elif isinstance(default, dict):
            ok, wanted = isinstance(value, dict) and all(_is_number(v) for v in value.values()), \
                "a mapping of module patterns to numbers"
        else:
            ok, wanted = _is_number(value), "a finite number"
        if not ok:
            raise AdapterError(f"{self.folder / CONFIG_NAME}: {name} is {json.dumps(value)}, expected {wanted}")
        return value

    @cached_property
    def config(self):
        """PEFT's LoraConfig of the adapter (imports peft): for writing adapters (adapter-space merging)."""
        from peft import LoraConfig

        known = {k: v for k, v in self.config_dict.items() if k in LoraConfig.__dataclass_fields__}
        try:
            return LoraConfig(**known)
        except (TypeError, ValueError) as error:
            raise AdapterError(f"{self.folder / CONFIG_NAME}: rejected by peft.LoraConfig "
                               f"({' '.join(str(error).split())})") from None

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config_dict.get("base_model_name_or_path") or None

    def _index(self) -> None:
        factors: dict[str, dict[str, str]] = {}
        where = self.file.path
        for key in self.file.tensors:
            if not key.startswith(PREFIX):
                raise AdapterError(f"{where}: key {key!r} does not start with {PREFIX!r} (not a PEFT LoRA "
                                   f"state dict)")
            name = key[len(PREFIX):]
            match = FACTOR.match(name)
            if match:
                if match["part"].startswith("lora_magnitude_vector"):
                    raise AdapterError(f"{where}: key {key!r} is a DoRA magnitude; DoRA is not supported")
                factors.setdefault(match["module"], {})[match["part"]] = key
            elif ".original_module." in name:
                continue
            elif ".base_layer." in name:   # the base weight PEFT saved beside an embedding adapter
                self.base_layers[name.replace(".base_layer.", ".")] = key
            else:
                target = name.replace(".modules_to_save.", ".")
                if target in self.full and self.file.tensors[key].shape != self.file.tensors[self.full[target]].shape:
                    raise AdapterError(f"{where}: keys {self.full[target]!r} and {key!r} both replace {target!r}")
                self.full.setdefault(target, key)
        fan_in_fan_out = self._fold_field("fan_in_fan_out")
        lora_alpha, use_rslora = self._fold_field("lora_alpha"), self._fold_field("use_rslora")
        alpha_pattern = self._fold_field("alpha_pattern")
        for module, parts in factors.items():
            embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
            if a_part not in parts or b_part not in parts:
                missing = a_part if a_part not in parts else b_part
                raise AdapterError(f"{where}: module {module!r} has no {missing} factor")
            a_shape, b_shape = self.file.tensors[parts[a_part]].shape, self.file.tensors[parts[b_part]].shape
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise AdapterError(f"{where}: module {module!r}: only 2-D (Linear / Conv1D / Embedding) LoRA "
                                   f"factors are supported, got A {list(a_shape)}, B {list(b_shape)}")
            rank = a_shape[0]
            if rank < 1 or b_shape[1] != rank:
                raise AdapterError(f"{where}: module {module!r}: A is {list(a_shape)} and B {list(b_shape)}; "
                                   f"they do not share a rank ≥ 1")
            alpha = float(alpha_pattern.get(pattern_key(alpha_pattern, module), lora_alpha))
            scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
            self.modules[module] = LoraModule(module, parts[a_part], parts[b_part], rank, alpha, scaling,
                                              transpose=embedding or fan_in_fan_out, embedding=embedding,
                                              bias_key=parts.get("lora_B.bias"))
        if not self.modules and not self.full and not self.base_layers:
            raise AdapterError(f"{where}: the adapter holds no tensors")

    def factors(self, module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        return self.file.read(module.a_key), self.file.read(module.b_key)

    def read(self, key: str) -> torch.Tensor:
        return self.file.read(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file.tensors[key].shape


def delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float, transpose: bool) -> torch.Tensor:
    """PEFT's get_delta_weight in float32: transpose(B @ A, transpose) · scaling, in that order of operations
    (so the folded weight equals merge_and_unload()'s bit for bit)."""
    product = b.float() @ a.float()
    if scaling != 1:   # in place: the bits of (B @ A) · scaling, one buffer (× 1 is the identity, bit for bit)
        product.mul_(scaling)
    return product.T if transpose else product


def _row_factors(a: torch.Tensor, b: torch.Tensor, transpose: bool, first: int,
                 last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMM operands whose product is rows [first, last) of transpose(B @ A, transpose)."""
    if transpose:
        return a[:, first:last].float().T, b.float().T
    return b[first:last].float(), a.float()


# GEMM layouts for which this process's BLAS gave addmm's C + s·(L @ R), C = float(W), the bits of PEFT's
# ((L @ R) · s) followed by + C (seen once per layout; a kernel's order of operations depends on the
# shapes, strides, alignment and threads, never on the values)
_FUSED: dict[tuple, bool] = {}
_FUSED_LOCK = threading.Lock()


def add_delta_rows(wide: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, transpose: bool,
                   first: int, last: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """float(W) + rows [first, last) of delta_weight with merge_and_unload's bits, for pieces of large tensors:
    `wide` holds the rows of float(W) (float32, rows × columns; overwritten or returned), `scratch` an
    optional float32 buffer of the same shape for the product.

    One GEMM with C = float(W) (addmm, β = 1, α = scaling) where that gave the bits of the product, its
    scaling and the addition done one after another for the same layout (checked on the first piece of each
    layout, float32 bits compared: with one block over the rank the kernel adds C to the finished dot
    products); otherwise those three steps. The fused GEMM saves the addition's pass over the piece."""
    left, right = _row_factors(a, b, transpose, first, last)
    key = (tuple(left.shape), left.stride(), left.data_ptr() % 64, tuple(right.shape), right.stride(),
           right.data_ptr() % 64, wide.stride(), wide.data_ptr() % 64, float(scaling), torch.get_num_threads(),
           wide.device.type)
    fused = _FUSED.get(key)
    if fused:
        return wide.addmm_(left, right, alpha=scaling)
    product = left @ right if scratch is None else torch.matmul(left, right, out=scratch)
    if scaling != 1:   # in place: the bits of (B @ A) · scaling (× 1 is the identity, bit for bit)
        product.mul_(scaling)
    if fused is None:
        trial = wide.clone().addmm_(left, right, alpha=scaling)
        result = product.add_(wide)
        with _FUSED_LOCK:
            _FUSED[key] = torch.equal(trial.view(torch.int32), result.view(torch.int32))
        return result
    return product.add_(wide)
