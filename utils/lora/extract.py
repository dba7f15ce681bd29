"""Extract a PEFT LoRA adapter from any fine-tune: per module, low-rank factors of ΔW = W_model − W_base.

One module at a time (two tensors read, factors kept, nothing else held):

- rank: the top singular directions of ΔW, r = min(rank, count(σ > sv_epsilon), min(m, n)) (mergekit's
  rule; either bound may be absent); B = U_r diag(√σ_r), A = diag(√σ_r) V_rᵀ ("distribute scale", as
  mergekit), so B A is the best rank-r approximation of ΔW. The decomposition works in the smaller
  dimension k = min(m, n): the Gram matrix ΔW ΔWᵀ (or ΔWᵀ ΔW) in float64 and the eigenpairs of its r
  largest eigenvalues (or of those above sv_epsilon²; LAPACK's MRRR, float64, only the wanted vectors)
  give σ and U, then A = U_rᵀ ΔW / √σ. That is cheaper than the full float32 SVD per module that
  mergekit-extract-lora runs, and as exact (float64 throughout).
- which tensors: 2-D weights of Linear / Conv1D modules (Conv1D: ΔWᵀ is decomposed, fan_in_fan_out);
  embeddings and lm_head per ``embeddings``: ``lora`` (Embedding: lora_embedding_A/B; lm_head: a Linear
  LoRA; a tied lm_head is the input embedding's tensor and gets its LoRA once, without PEFT's
  ``ensure_weight_tying``: merge_and_unload() then gives the fine-tune exactly, while PEFT's unmerged
  forward applies the delta on the input side only — with ensure_weight_tying, peft 0.21 gets the unmerged
  forward right but adds the delta twice when merging), ``full`` (modules_to_save),
  ``skip``; a fine-tune with a resized vocabulary always stores them in full. Everything else that changed
  (norms, biases, other 1-D tensors) per ``non_lora``: ``save`` (a LoRA module's bias as lora_B.bias with
  lora_bias=True, any other module in full as modules_to_save), ``skip``, or ``refuse`` (an error).
- unchanged tensors give nothing; a module whose rank comes out 0 (all σ ≤ sv_epsilon) is left out.

Outputs: a PEFT adapter folder (adapter_model.safetensors with PEFT's key names, adapter_config.json by
peft.LoraConfig: r = the largest rank, lora_alpha = r, rank_pattern / alpha_pattern for the others, so
each module's scaling is 1) and ``extract_report.json``: per module its rank, ‖ΔW‖_F and the
reconstruction error ‖ΔW − B A‖_F of the factors as stored (after rounding to the output dtype), plus
totals (relative error = √Σ err² / √Σ ‖ΔW‖²), the options, versions and timing.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from utils.engine.reader import open_checkpoint

from .adapter import CONV1D_MODEL_TYPES, PREFIX, AdapterError
from .fold import EMBEDDING_SUFFIXES, _config

REPORT_NAME = "extract_report.json"
EMBEDDING_CHOICES = ("lora", "full", "skip")
NON_LORA_CHOICES = ("save", "skip", "refuse")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
logger = logging.getLogger("mergelm.lora")


@dataclass
class ExtractJob:
    base_model: str
    model: str
    output_dir: str
    rank: int | None = None            # the most directions kept per module
    sv_epsilon: float | None = None    # singular values kept are > sv_epsilon
    embeddings: str = "lora"
    non_lora: str = "save"
    include_regex: list[str] = field(default_factory=list)   # modules extracted must match one (when given)
    exclude_regex: list[str] = field(default_factory=list)
    dtype: str | None = None           # factors' dtype (default: the fine-tune's)
    overwrite: bool = False

    def validate(self) -> None:
        if self.rank is None and self.sv_epsilon is None:
            raise AdapterError("give --rank, --sv_epsilon or both")
        if self.rank is not None and self.rank < 1:
            raise AdapterError(f"--rank must be ≥ 1, got {self.rank}")
        if self.sv_epsilon is not None and not self.sv_epsilon >= 0:
            raise AdapterError(f"--sv_epsilon must be ≥ 0, got {self.sv_epsilon}")
        if self.embeddings not in EMBEDDING_CHOICES or self.non_lora not in NON_LORA_CHOICES:
            raise AdapterError(f"embeddings must be one of {EMBEDDING_CHOICES}, non_lora one of {NON_LORA_CHOICES}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise AdapterError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype}")
        for pattern in [*self.include_regex, *self.exclude_regex]:
            try:
                re.compile(pattern)
            except re.error as error:
                raise AdapterError(f"bad regex {pattern!r}: {error}") from None


def _top_eigenpairs(gram: torch.Tensor, count: int | None, floor: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest eigenvalues (descending) and their eigenvectors of the symmetric float64 `gram`: the top
    `count`, or (count None) those above `floor`. LAPACK's MRRR (dsyevr through scipy) computes only the
    wanted eigenvectors, in float64: about twice as fast as torch's full float32 eigh on a 2048² Gram."""
    from scipy.linalg import eigh

    k = gram.shape[0]
    if count is not None:
        values, vectors = eigh(gram.numpy(), subset_by_index=[k - count, k - 1], driver="evr")
    else:
        values, vectors = eigh(gram.numpy(), subset_by_value=[floor, math.inf], driver="evr")
    return torch.from_numpy(values).flip(0), torch.from_numpy(vectors).flip(1)


def low_rank(delta: torch.Tensor, rank: int | None, sv_epsilon: float | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """(A, B, σ) with B A the best rank-r approximation of `delta` (m × n), r as in the module docstring;
    A: r × n, B: m × r in float32; σ: the r kept singular values (float64, descending), or, when none is
    kept, the largest one alone (σ_max, for the report)."""
    wide = delta.shape[0] <= delta.shape[1]
    d = delta.to(torch.float64)
    gram = d @ d.T if wide else d.T @ d
    k = gram.shape[0]
    wanted = k if rank is None else min(rank, k)
    if sv_epsilon is not None and rank is None:
        values, vectors = _top_eigenpairs(gram, None, sv_epsilon ** 2)
    else:
        values, vectors = _top_eigenpairs(gram, wanted, None)
    sigma = values.clamp_min(0).sqrt()
    keep = sigma.shape[0]
    if sv_epsilon is not None:
        keep = min(keep, int((sigma > sv_epsilon).sum()))
    if not delta.any():   # an unchanged module: nothing to keep
        keep = 0
    if not sigma.numel():   # nothing above the threshold: σ_max alone, for the report
        sigma = _top_eigenpairs(gram, 1, None)[0].clamp_min(0).sqrt()
    basis, s = vectors[:, :keep], sigma[:keep]
    root = s.sqrt()
    usable = s > sigma[0] * 1e-12 if keep else s > 0   # directions of σ ≈ 0 carry nothing: zero factors
    inverse = torch.where(usable, 1 / torch.where(usable, root, torch.ones_like(root)), torch.zeros_like(root))
    projected = basis.T @ d if wide else d @ basis        # wide: Uᵀ ΔW (r × n); tall: ΔW V (m × r)
    if wide:
        b, a = basis * root, projected * inverse[:, None]
    else:
        a, b = (basis * root).T, projected * inverse
    return a.float(), b.float(), sigma


@dataclass
class _Module:
    name: str            # module path
    kind: str            # linear | conv1d | embedding


def _module_kinds(folder: Path, config: dict) -> dict[str, str]:
    """Module path → linear / conv1d / embedding / other, from the transformers class built on the meta
    device (no weights); {} when the class cannot be built (names decide then)."""
    try:
        import transformers
        from transformers import AutoConfig
        from transformers.pytorch_utils import Conv1D

        hf_config = AutoConfig.from_pretrained(folder)
        architecture = (config.get("architectures") or [None])[0]
        model_class = getattr(transformers, architecture, None) if architecture else None
        with torch.device("meta"):
            model = (model_class._from_config(hf_config) if model_class is not None
                     else transformers.AutoModel.from_config(hf_config))
    except Exception as error:  # unknown or remote-code architectures: fall back to names
        logger.warning(f"module types of {folder} unknown ({type(error).__name__}); telling embeddings by name")
        return {}
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(module, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
        elif hasattr(module, "weight") and name:
            kinds[name] = "other"
    return kinds


def _kind(module: str, kinds: dict[str, str], model_type: str | None) -> str:
    if module in kinds:
        return kinds[module]
    if (module + ".weight").endswith(EMBEDDING_SUFFIXES) or module.endswith(("wpe", "position_embeddings",
                                                                                "token_type_embeddings")):
        return "embedding"
    return "conv1d" if model_type in CONV1D_MODEL_TYPES and not module.endswith("lm_head") else "linear"


def extract_lora(job: ExtractJob) -> dict:
    """Extract job.model − job.base_model into the adapter folder job.output_dir; returns the report."""
    from safetensors.torch import save_file

    from utils.manifest import hash_beside, input_record, run_manifest
    from utils.records import check_output_folder, write_folder_atomic

    started = time.time()
    job.validate()
    base_folder, base = open_checkpoint(job.base_model)
    model_folder, model = open_checkpoint(job.model)
    inputs = {"the base input": base_folder, "the model input": model_folder}
    check_output_folder(job.output_dir, inputs, overwrite=True)   # the one output guard (utils/records.py)
    if Path(job.output_dir).exists() and not job.overwrite:
        raise AdapterError(f"output folder {job.output_dir} already exists; pass --overwrite to replace it")
    config = _config(model_folder)
    kinds = _module_kinds(model_folder, config)
    names = base.names()
    missing = [n for n in names if n not in set(model.names())]
    extra = [n for n in model.names() if n not in set(names)]
    if missing or extra:
        which = f"{missing[0]!r} is missing from the model" if missing else f"{extra[0]!r} is not in the base"
        raise AdapterError(f"{job.model} and {job.base_model} have different tensors: {which}")
    plan = _plan(job, base, model, names, kinds, config.get("model_type"))
    out_dtype = DTYPES[job.dtype] if job.dtype else None
    record: dict = {}

    def write(staging: Path) -> None:
        _, digests = hash_beside([*base.weight_files(), *model.weight_files()], lambda: build(staging))
        described = [input_record("base", job.base_model, base_folder, base.weight_files(), digests),
                     input_record("model", job.model, model_folder, model.weight_files(), digests)]
        report = run_manifest("extract_lora", started, described, **record)
        record.clear()
        record.update(report | {"seconds": report["wall_seconds"]})
        (staging / REPORT_NAME).write_text(json.dumps(record, indent=2) + "\n")

    def build(staging: Path) -> None:
        tensors, modules, ranks, lora_bias, to_save = {}, [], {}, False, []
        squares, errors = 0.0, 0.0
        for item in plan["lora"]:
            base_w, model_w = base.get(item.name + ".weight"), model.get(item.name + ".weight")
            dtype = out_dtype or model_w.dtype
            # one float64 copy of ΔW serves the decomposition, its norm and the residual (in place): every
            # fresh buffer of this size costs its page faults again (~0.75 ms per MB here)
            delta = model_w.to(torch.float64).sub_(base_w)
            del base_w, model_w
            oriented = delta.T if item.kind in ("conv1d", "embedding") else delta   # B @ A is out × in
            a, b, sigma = low_rank(oriented, job.rank, job.sv_epsilon)
            a, b = a.to(dtype), b.to(dtype)
            norm = float(oriented.norm())
            error = float(oriented.sub_(b.double() @ a.double()).norm())
            squares, errors = squares + norm ** 2, errors + error ** 2
            rank = a.shape[0]
            modules.append({"module": item.name, "kind": item.kind, "rank": rank, "shape": list(delta.shape),
                            "delta_norm": norm, "error": error, "relative_error": error / norm if norm else 0.0,
                            "sigma_max": float(sigma[0]) if sigma.numel() else 0.0})
            if rank == 0:   # nothing low-rank to keep; a changed bias still needs the module, in full
                if item.name in plan["bias"]:
                    plan["full"][item.name] = [item.name + ".weight", item.name + ".bias"]
                continue
            ranks[item.name] = rank
            parts = ("lora_embedding_A", "lora_embedding_B") if item.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
            tensors[f"{PREFIX}{item.name}.{parts[0]}"] = a.contiguous()
            tensors[f"{PREFIX}{item.name}.{parts[1]}"] = b.contiguous()
            if item.name in plan["bias"]:
                bias = item.name + ".bias"
                tensors[f"{PREFIX}{item.name}.lora_B.bias"] = (model.get(bias).float() - base.get(bias).float()).to(dtype)
                lora_bias = True
        for module, tensor_names in plan["full"].items():
            to_save.append(module)
            for name in tensor_names:
                tensors[PREFIX + name] = model.get(name).contiguous()
        if not ranks and not to_save:
            raise AdapterError(f"nothing to extract: {job.model} does not differ from {job.base_model} in any "
                               f"extracted module (or every rank came out 0)")
        save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
        top = max(ranks.values(), default=1)
        pattern = {m: r for m, r in ranks.items() if r != top}
        from peft import LoraConfig

        lora_config = LoraConfig(r=top, lora_alpha=top, target_modules=sorted(ranks) or None, rank_pattern=pattern,
                                 alpha_pattern=dict(pattern), modules_to_save=sorted(to_save) or None,
                                 lora_bias=lora_bias, lora_dropout=0.0, bias="none",
                                 fan_in_fan_out=any(i.kind == "conv1d" for i in plan["lora"]),
                                 base_model_name_or_path=job.base_model, inference_mode=True)
        lora_config.save_pretrained(str(staging))
        record.update({
            "base_model": job.base_model, "model": job.model, "options": asdict(job), "rank": top,
            "modules": modules, "modules_to_save": sorted(to_save), "skipped": plan["skipped"],
            "total": {"delta_norm": math.sqrt(squares), "error": math.sqrt(errors),
                      "relative_error": math.sqrt(errors / squares) if squares else 0.0,
                      "lora_modules": len(ranks), "full_tensors": sum(len(v) for v in plan["full"].values()),
                      "adapter_parameters": sum(t.numel() for t in tensors.values())}})

    write_folder_atomic(job.output_dir, write, overwrite=job.overwrite, inputs=inputs)
    return record


def _changed(base, model, name: str) -> bool:
    return not torch.equal(base.get(name), model.get(name))


def _plan(job: ExtractJob, base, model, names: list[str], kinds: dict[str, str], model_type: str | None) -> dict:
    """Which modules get LoRA factors, which tensors are saved in full, which are skipped (and why)."""
    wanted = lambda module: ((not job.include_regex or any(re.search(p, module) for p in job.include_regex))
                             and not any(re.search(p, module) for p in job.exclude_regex))
    lora, full, skipped, bias_of = [], {}, [], set()
    handled = set()
    for name in names:
        base_shape, model_shape = base.info(name)[1], model.info(name)[1]
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or len(base_shape) != 2:
            continue
        kind = _kind(module, kinds, model_type)
        head = module.endswith("lm_head") or kind == "embedding"
        if not wanted(module):
            continue
        handled.add(name)
        if base_shape != model_shape:
            if head and base_shape[1:] == model_shape[1:]:   # resized vocabulary: only a full copy fits
                full.setdefault(module, []).append(name)
                logger.warning(f"{name}: {base_shape[0]} rows in the base, {model_shape[0]} in the model; saved in full")
                continue
            raise AdapterError(f"tensor {name!r} is {list(model_shape)} in {job.model} but {list(base_shape)} in "
                               f"{job.base_model}")
        if head and job.embeddings != "lora":
            if job.embeddings == "full" and _changed(base, model, name):
                full.setdefault(module, []).append(name)
            elif job.embeddings == "skip":
                skipped.append({"tensor": name, "why": "--embeddings skip"})
            continue
        if kind == "other":
            handled.discard(name)
            continue
        lora.append(_Module(module, "embedding" if kind == "embedding" else kind))
    lora_modules = {m.name for m in lora}
    for name in names:   # everything else that changed: norms, biases, other tensors
        if name in handled:
            continue
        module = name.rpartition(".")[0]
        if base.info(name)[1] != model.info(name)[1]:
            raise AdapterError(f"tensor {name!r} is {list(model.info(name)[1])} in {job.model} but "
                               f"{list(base.info(name)[1])} in {job.base_model}")
        if not _changed(base, model, name):
            continue
        if job.non_lora == "refuse":
            raise AdapterError(f"tensor {name!r} changed and is not low-rank (a norm or bias); pass --non_lora save "
                               f"to store it in full (modules_to_save) or --non_lora skip to leave it out")
        if job.non_lora == "skip" or not wanted(module):
            skipped.append({"tensor": name, "why": "--non_lora skip" if job.non_lora == "skip" else "excluded"})
        elif module in lora_modules and name.endswith(".bias"):
            bias_of.add(module)
        elif module in lora_modules:
            raise AdapterError(f"tensor {name!r} of LoRA module {module!r} changed; it cannot be stored beside "
                               f"the module's LoRA (exclude the module to save it in full)")
        else:
            full.setdefault(module, [])
    for module in list(full):   # a module saved in full carries all of its tensors (PEFT copies the module)
        full[module] = sorted({n for n in names if n.rpartition(".")[0] == module} | set(full[module]))
    return {"lora": lora, "full": full, "skipped": skipped, "bias": bias_of}
