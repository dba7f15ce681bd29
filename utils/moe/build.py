"""Streaming construction of a mixture-of-experts checkpoint from homologous dense models.

Attention, embeddings and norms come from the base model; in every layer, expert e's gate/up/down
projections are expert e's dense MLP, copied tensor by tensor into the output shards (with the expert's
optional noise and residual scale, see `expert_tensor`), and the router is the gate matrix of
utils/moe/gates.py. Routers are computed first (the base model's forward pass for ``hidden`` gates, then
released); the copy holds one tensor at a time. The folder is written beside the target and renamed into
place when complete (utils/records.py).
"""
from __future__ import annotations

import json
import math
import re
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from utils.cli import resolve_device
from utils.engine.allocator import tune_allocator
from utils.engine.reader import CheckpointError, CheckpointReader, resolve_checkpoint
from utils.engine.writer import PlannedTensor, ShardedSafetensorsWriter
from utils.engine.streaming import DTYPES
from utils.cards import fenced, front_matter
from utils.manifest import hash_beside, input_record, run_manifest
from utils.records import OutputExistsError, check_output_folder, write_folder_atomic

from .config import PROMPT_GATE_MODES, ExpertConfig, MoEConfig
from .gates import DEGENERATE_CONDITION, PromptEncoder, condition_numbers, prompt_gates, random_gate, seeded_normal
from .layouts import LAYOUTS, MLP_TENSOR, PROJECTIONS, Layout, default_architecture, output_config

TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|"
                             r"merges\.txt|.*\.tiktoken|spiece\.model|chat_template\.(jinja|json)|"
                             r"generation_config\.json)$")
COMPARED_CONFIG_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "hidden_act")


class MoEError(ValueError):
    """Inputs that cannot make the requested MoE: the message names the key, model or tensor."""


@dataclass
class MoEJob:
    """A resolved build: the validated config (and its text, kept verbatim) plus run options."""

    config: MoEConfig
    config_text: str
    output_dir: str
    seed: int = 0
    dtype: str | None = None          # overrides config.dtype
    device: str = "cpu"
    overwrite: bool = False
    allow_pickle: bool = False
    max_shard_size: int = 5 * 2**30
    progress: bool = True
    config_path: str | None = None
    threads: int | None = None        # torch intra-op threads during the build (None: leave torch's setting)


@dataclass
class Model:
    role: str                          # "base", "experts[0]", "shared_experts[0]"
    source: str
    path: Path
    reader: CheckpointReader
    config: dict


@dataclass
class Plan:
    tensors: list[PlannedTensor] = field(default_factory=list)
    producers: list[Callable[[], torch.Tensor]] = field(default_factory=list)
    sources: dict[str, dict] = field(default_factory=dict)   # output → {input role: its tensor(s)}
    moved: set[str] = field(default_factory=set)              # outputs stacking their sources (fused experts)

    def add(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], produce: Callable[[], torch.Tensor],
            sources: dict | None = None, moved: bool = False):
        self.tensors.append(PlannedTensor(name, dtype, tuple(shape)))
        self.producers.append(produce)
        self.sources[name] = sources or {}
        if moved:
            self.moved.add(name)


def run_moe_build(job: MoEJob) -> dict:
    """Build the MoE into job.output_dir; returns the manifest it writes (merge_manifest.json)."""
    started = time.time()
    tune_allocator()
    previous_threads = torch.get_num_threads()
    if job.threads:
        torch.set_num_threads(job.threads)
    try:
        return _build(job, started)
    finally:
        torch.set_num_threads(previous_threads)


def _build(job: MoEJob, started: float) -> dict:
    config = job.config
    try:
        device = str(resolve_device(job.device))
    except ValueError as error:
        raise MoEError(f"--device: {error}") from None
    if job.dtype is not None and job.dtype not in DTYPES:
        raise MoEError(f"--dtype: unknown dtype {job.dtype!r}; valid: {', '.join(DTYPES)}")
    if Path(job.output_dir).exists() and not job.overwrite:
        raise OutputExistsError(f"{job.output_dir} exists; pass --overwrite to replace it")
    base, experts, shared = _open_models(job)
    inputs = {f"the {model.role} input": model.path for model in [base, *experts, *shared]}
    check_output_folder(job.output_dir, inputs, overwrite=job.overwrite)   # the one output guard (utils/records.py)
    base_config = _base_config(base)
    layout, chosen_by = _layout(config, base)
    _check_base_tensors(base, layout, base_config.num_hidden_layers, bool(base_config.tie_word_embeddings))
    for model in experts + shared:
        _check_expert(base, model)
    if len(experts) > 1 and len({model.path.resolve() for model in experts}) == 1:
        # mergekit-moe refuses this without --i-understand-this-is-not-useful-without-training; it is the
        # exact-equivalence check of a layout, so here it is only a warning
        print("warning: every expert is the same model: the MoE computes what that model computes, at a higher "
              "cost, until it is trained", file=sys.stderr)
    dtype_name = job.dtype or config.dtype or _base_dtype(base)
    out_dtype = DTYPES[dtype_name]
    gates, shared_gates, gate_report = _gates(job, layout, base, base_config, device)
    plan = _plan(job, layout, base, experts, shared, gates, shared_gates, out_dtype)
    fates = _fates(plan, base, experts + shared)
    moe_config = output_config(layout, base_config, len(experts), config.experts_per_token, dtype_name)

    def write(staging: Path) -> None:
        readers = [model.reader for model in [base, *experts, *shared]]
        files, digests = hash_beside([path for reader in readers for path in reader.weight_files()],
                                     lambda: _write_tensors(job, plan, staging, readers))
        moe_config.save_pretrained(staging)
        copied = _copy_tokenizer(base.path, staging)
        manifest.update(_manifest(job, layout, chosen_by, dtype_name, device, base, experts, shared, plan, files,
                                  copied, gate_report, digests, started))
        manifest["tensor_fates"] = fates
        (staging / "README.md").write_text(model_card(job, layout, Path(job.output_dir).name), encoding="utf-8")
        (staging / "merge_manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")

    manifest: dict = {}
    write_folder_atomic(job.output_dir, write, overwrite=job.overwrite, inputs=inputs)
    return manifest


def _open_models(job: MoEJob) -> tuple[Model, list[Model], list[Model]]:
    readers: dict[Path, CheckpointReader] = {}

    def open_one(role: str, source: str) -> Model:
        try:
            path = resolve_checkpoint(source, job.allow_pickle)
            if path.resolve() not in readers:
                readers[path.resolve()] = CheckpointReader(path, job.allow_pickle)
        except CheckpointError as error:
            raise MoEError(f"{role}: {error}") from None
        config_file = path / "config.json"
        if not config_file.is_file():
            raise MoEError(f"{role}: {source} has no config.json")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise MoEError(f"{role}: {config_file} is not valid JSON ({error})") from None
        return Model(role, source, path, readers[path.resolve()], config)

    config = job.config
    base = open_one("base_model", config.base_model)
    experts = [open_one(f"experts[{i}]", e.source_model) for i, e in enumerate(config.experts)]
    shared = [open_one(f"shared_experts[{i}]", e.source_model) for i, e in enumerate(config.shared_experts or [])]
    return base, experts, shared


def _base_config(base: Model):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base.path)
    except (ValueError, KeyError, OSError) as error:
        raise MoEError(f"base_model: transformers cannot read the config of {base.source} ({error})") from None


def _layout(config: MoEConfig, base: Model) -> tuple[Layout, str]:
    model_type = base.config.get("model_type")
    shared = len(config.shared_experts or [])
    accepted = "; ".join(f"{name} from {'/'.join(layout.base_model_types)}" for name, layout in LAYOUTS.items())
    if config.architecture is None:
        name = default_architecture(model_type, shared)
        if name is None:
            raise MoEError(f"base_model: no MoE layout is built from model_type {model_type!r} of "
                           f"{base.source} ({accepted})")
        chosen_by = f"default for a {model_type} base" + (" with a shared expert" if shared else "")
    else:
        name, chosen_by = config.architecture, "config"
    layout = LAYOUTS[name]
    if model_type not in layout.base_model_types:
        raise MoEError(f"architecture: {name} cannot be built from base_model {base.source} (model_type "
                       f"{model_type!r}); {accepted}")
    if shared != layout.shared_experts:
        what = "has no shared expert" if layout.shared_experts == 0 else "needs exactly one shared expert"
        hint = ("; for no shared contribution use the base with residual_scale: 0" if layout.shared_experts
                else "; use architecture: qwen2_moe for one shared expert")
        raise MoEError(f"shared_experts: {name} {what}, the config has {shared}{hint}")
    return layout, chosen_by


def _check_base_tensors(base: Model, layout: Layout, num_layers: int, tied: bool) -> None:
    names = set(base.reader.names())
    for name in base.reader.names():
        if not MLP_TENSOR.match(name) and not layout.accepts(name):
            raise MoEError(f"base_model: tensor {name!r} of {base.source} has no place in the {layout.name} layout")
    for layer in range(num_layers):
        for projection in PROJECTIONS:
            name = f"model.layers.{layer}.mlp.{projection}.weight"
            if name not in names:
                raise MoEError(f"base_model: tensor {name!r} is missing from {base.source}")
    if "lm_head.weight" not in names and not tied:
        raise MoEError(f"base_model: tensor 'lm_head.weight' is missing from {base.source} and its config does "
                       f"not tie it to the embeddings (tie_word_embeddings)")


def _check_expert(base: Model, expert: Model) -> None:
    """The expert has every MLP tensor of the base with the same shape, and the same architecture keys."""
    names = set(expert.reader.names())
    for name in base.reader.names():
        if not MLP_TENSOR.match(name):
            continue
        if name not in names:
            raise MoEError(f"{expert.role}: tensor {name!r} is missing from {expert.source}")
        shape, base_shape = expert.reader.info(name)[1], base.reader.info(name)[1]
        if shape != base_shape:
            raise MoEError(f"{expert.role}: tensor {name!r} has shape {tuple(shape)} in {expert.source} but "
                           f"{tuple(base_shape)} in the base {base.source}")
    for key in COMPARED_CONFIG_KEYS:
        # a key absent from one config.json has its class default there; only model_type must always be stated
        both = key in expert.config and key in base.config
        if (both or key == "model_type") and expert.config.get(key) != base.config.get(key):
            raise MoEError(f"{expert.role}: {expert.source} has {key} {expert.config.get(key)!r}, the base "
                           f"{base.source} has {base.config.get(key)!r}")


def _base_dtype(base: Model) -> str:
    declared = base.config.get("dtype") or base.config.get("torch_dtype")
    if declared in DTYPES:
        return declared
    dtype = base.reader.info("model.embed_tokens.weight")[0]
    return next((name for name, value in DTYPES.items() if value == dtype), "float32")


def _gates(job: MoEJob, layout: Layout, base: Model, base_config, device: str) -> tuple[list, list, dict]:
    """Router rows per layer for the routed experts (L × (E, d)) and the shared expert gate (L × (1, d))."""
    config = job.config
    num_layers, hidden = base_config.num_hidden_layers, base_config.hidden_size
    routed, shared_count = len(config.experts), len(config.shared_experts or [])
    report: dict = {"mode": config.gate_mode}
    if config.gate_mode in PROMPT_GATE_MODES:
        embeddings = None
        if config.gate_mode == "cheap_embed":
            embeddings = base.reader.get("model.embed_tokens.weight").to(device)
        try:
            encoder = PromptEncoder(config.gate_mode, base.path, embeddings, num_layers, device)
        except (OSError, ValueError) as error:
            raise MoEError(f"base_model: gate_mode {config.gate_mode} needs the tokenizer and model of "
                           f"{base.source}, which transformers cannot load ({error})") from None
        try:
            rows, prompt_report = prompt_gates(encoder, config.all_experts)
        finally:
            encoder.close()
            del encoder
        gates = [rows[layer, :routed].contiguous() for layer in range(num_layers)]
        shared_gates = [rows[layer, routed:].contiguous() for layer in range(num_layers)] if shared_count else []
        report["prompts"] = [{"expert": role} | counts for role, counts in
                             zip(_roles(config), prompt_report)]
    else:
        gates = [random_gate(config.gate_mode, job.seed, layout.router_name(layer), routed, hidden)
                 for layer in range(num_layers)]
        shared_gates = [random_gate(config.gate_mode, job.seed, layout.shared_router_name(layer), shared_count,
                                    hidden) for layer in range(num_layers)] if shared_count else []
    numbers = condition_numbers(gates)
    report["condition_numbers"] = [round(n, 4) if math.isfinite(n) else None for n in numbers]
    report["degenerate_layers"] = [layer for layer, n in enumerate(numbers) if not n <= DEGENERATE_CONDITION]
    if report["degenerate_layers"] and routed > 1:
        print(f"warning: router rows of layers {report['degenerate_layers']} are nearly linearly dependent "
              f"(condition number > {DEGENERATE_CONDITION:g}): the prompts may be too similar, and some experts "
              f"will be used little", file=sys.stderr)
    return gates, shared_gates, report


def _roles(config: MoEConfig) -> list[str]:
    return ([f"experts[{i}]" for i in range(len(config.experts))]
            + [f"shared_experts[{i}]" for i in range(len(config.shared_experts or []))])


def expert_tensor(tensor: torch.Tensor, expert: ExpertConfig, residual: bool, seed: int, index: int, name: str,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """W' = (W + noise_scale·N) · residual_scale (residual_scale on down_proj only), in float32, then cast.

    N is N(0, 1) drawn from (seed, expert index in experts + shared_experts, output tensor name). Without
    noise or scale the tensor is copied as is (only cast)."""
    scale = expert.residual_scale if residual else None
    if not expert.noise_scale and scale is None:
        return tensor.to(out_dtype)
    work = tensor.float()
    if expert.noise_scale:
        work = work + expert.noise_scale * seeded_normal(seed, index, name, tuple(work.shape)).to(work.device)
    if scale is not None:
        work = work * scale
    return work.to(out_dtype)


def _plan(job: MoEJob, layout: Layout, base: Model, experts: list[Model], shared: list[Model],
          gates: list[torch.Tensor], shared_gates: list[torch.Tensor], out_dtype: torch.dtype) -> Plan:
    """Output tensors in the base's order; a layer's router, experts and shared expert where its MLP was."""
    config, plan = job.config, Plan()
    cast = lambda dtype: out_dtype if dtype.is_floating_point else dtype  # noqa: E731
    routed_layers: set[int] = set()

    def copy(reader: CheckpointReader, name: str, dtype: torch.dtype):
        return lambda: reader.get(name).to(dtype)

    def from_expert(model: Model, expert: ExpertConfig, index: int, source: str, target: str, residual: bool):
        return lambda: expert_tensor(model.reader.get(source), expert, residual, job.seed, index, target, out_dtype)

    def fused_experts(prefix: str, parts: tuple[str, ...]) -> torch.Tensor:
        # expert e's slice: its projections concatenated along rows (gate then up), as transformers 5 fuses them;
        # noise is drawn per expert under the per-expert name (mergekit-moe's name before the conversion)
        return torch.stack([torch.cat([from_expert(model, expert, index, f"{prefix}mlp.{part}.weight",
                                                   layout.expert_name(prefix, index, part), part == "down_proj")()
                                       for part in parts]) for index, (model, expert) in
                            enumerate(zip(experts, config.experts))])

    fused_added: set[str] = set()
    names = set(base.reader.names())
    for name in base.reader.names():
        dtype, shape = base.reader.info(name)
        match = MLP_TENSOR.match(name)
        if match is None:
            plan.add(name, cast(dtype), shape, copy(base.reader, name, cast(dtype)), {base.role: name})
            prefix, _, suffix = name.partition(".self_attn.")
            if suffix == "q_proj.weight":
                for zero in layout.zero_filled:
                    if f"{prefix}.{zero}" not in names:
                        rows = _bias_rows(base.reader, prefix, zero)
                        plan.add(f"{prefix}.{zero}", out_dtype, (rows,),
                                 lambda rows=rows: torch.zeros(rows, dtype=out_dtype))
            continue
        layer, prefix, projection = int(match["layer"]), match["prefix"], match["proj"]
        if layer not in routed_layers:
            routed_layers.add(layer)
            plan.add(layout.router_name(layer), out_dtype, tuple(gates[layer].shape),
                     lambda gate=gates[layer]: gate.to(out_dtype))
            if layout.shared_router is not None:
                plan.add(layout.shared_router_name(layer), out_dtype, tuple(shared_gates[layer].shape),
                         lambda gate=shared_gates[layer]: gate.to(out_dtype))
        residual = projection == "down_proj"
        if layout.fused:
            fused = layout.fused_name(prefix, projection)
            if fused not in fused_added:
                fused_added.add(fused)
                parts = ("down_proj",) if residual else ("gate_proj", "up_proj")
                rows = sum(base.reader.info(f"{prefix}mlp.{part}.weight")[1][0] for part in parts)
                plan.add(fused, out_dtype, (len(experts), rows, shape[1]),
                         lambda prefix=prefix, parts=parts: fused_experts(prefix, parts),
                         {model.role: tuple(f"{prefix}mlp.{part}.weight" for part in parts) for model in experts},
                         moved=True)
        else:
            for index, (model, expert) in enumerate(zip(experts, config.experts)):
                target = layout.expert_name(prefix, index, projection)
                plan.add(target, out_dtype, shape, from_expert(model, expert, index, name, target, residual),
                         {model.role: name})
        for offset, (model, expert) in enumerate(zip(shared, config.shared_experts or [])):
            target = layout.shared_name(prefix, projection)
            plan.add(target, out_dtype, shape,
                     from_expert(model, expert, len(experts) + offset, name, target, residual), {model.role: name})
    return plan


def _fates(plan: Plan, base: Model, experts: list[Model]) -> dict:
    """Every input tensor's fate (utils/engine/accounting.py). The build's two rules leave tensors out: the
    experts' non-MLP tensors (attention, embeddings and norms come from base_model) and the base's dense MLP
    (the experts replace it); anything else no output uses is an MoEError naming it."""
    from utils.engine.accounting import DropRule, UnaccountedTensors, account

    names = {model.role: model.reader.names() for model in [base, *experts]}
    rules = [DropRule("merge_moe: attention, embeddings and norms come from base_model",
                      lambda role, name: role != base.role and not MLP_TENSOR.match(name)),
             DropRule("merge_moe: the experts' MLPs replace the base's dense MLP",
                      lambda role, name: role == base.role and bool(MLP_TENSOR.match(name)))]
    try:
        return account(names, plan.sources, rules, hint="a base whose tensors the MoE layout has a place for",
                       moved=plan.moved)
    except UnaccountedTensors as error:
        raise MoEError(str(error)) from None


def _bias_rows(reader: CheckpointReader, prefix: str, bias: str) -> int:
    """Output rows of the projection a zero bias belongs to (q/k/v)."""
    weight = f"{prefix}.{bias.removesuffix('.bias')}.weight"
    return reader.info(weight)[1][0]


def _write_tensors(job: MoEJob, plan: Plan, staging: Path, readers: list[CheckpointReader]) -> list[str]:
    writer = ShardedSafetensorsWriter(staging, plan.tensors, job.max_shard_size, inputs=readers)
    items = zip(plan.tensors, plan.producers)
    if job.progress:
        from tqdm import tqdm
        items = tqdm(items, total=len(plan.tensors), desc="building MoE", unit="tensor")
    for planned, produce in items:
        writer.write(planned.name, produce())
    return writer.finish()


def _copy_tokenizer(source: Path, staging: Path) -> list[str]:
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and TOKENIZER_FILES.match(path.name):
            shutil.copyfile(path, staging / path.name)
            copied.append(path.name)
    return copied


def _describe_expert(expert: ExpertConfig, model: Model) -> dict:
    return {"role": model.role, "source_model": expert.source_model, "path": str(model.path)} | \
        expert.model_dump(exclude={"source_model"})


def _manifest(job: MoEJob, layout: Layout, chosen_by: str, dtype_name: str, device: str, base: Model,
              experts: list[Model], shared: list[Model], plan: Plan, files: list[str], copied: list[str],
              gate_report: dict, digests: dict, started: float) -> dict:
    config = job.config
    models = [base] + experts + shared
    unique = {model.path.resolve(): model for model in models}
    arguments = {key: value for key, value in asdict(job).items() if key not in ("config", "config_text")}
    described = [input_record(model.role, model.source, model.path, model.reader.weight_files(), digests,
                              roles=[m.role for m in models if m.path.resolve() == key])
                 for key, model in unique.items()]
    return run_manifest(
        "merge_moe", started, described,
        config_file=str(Path(job.config_path).resolve()) if job.config_path else None,
        config_text=job.config_text,
        config=config.model_dump(),
        arguments=arguments,
        seed=job.seed,
        architecture={"name": layout.name, "model_class": layout.model_class, "chosen_by": chosen_by},
        dtype=dtype_name,
        device=device,
        experts_per_token=config.experts_per_token,
        experts=[_describe_expert(e, m) for e, m in zip(config.experts, experts)],
        shared_experts=[_describe_expert(e, m) for e, m in zip(config.shared_experts or [], shared)],
        gates=gate_report,
        output={"files": files, "num_tensors": len(plan.tensors),
                "total_bytes": sum(t.nbytes for t in plan.tensors),
                "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in plan.tensors}),
                "tokenizer_files_from_base": copied},
        process_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )


def model_card(job: MoEJob, layout: Layout, title: str) -> str:
    """README.md: front matter, what was built from what, the experts with their prompts, the config verbatim."""
    config = job.config
    sources = [config.base_model] + [e.source_model for e in config.all_experts]
    lines = front_matter(sources, ["mergelm", "merge", "moe"])
    lines += [f"# {title}", "",
              f"A {layout.model_class} mixture of experts built with mergelm's `merge_moe.py` from dense models: "
              f"attention, embeddings and norms from `{config.base_model}`, one expert MLP per source model, "
              f"{config.experts_per_token} of {len(config.experts)} experts per token, routers initialised with "
              f"gate_mode `{config.gate_mode}`. The router is not trained.", "", "## Experts", ""]
    groups = [("expert", config.experts), ("shared expert", config.shared_experts or [])]
    for label, experts in groups:
        for index, expert in enumerate(experts):
            lines.append(f"- {label} {index}: `{expert.source_model}`")
            for key in ("positive_prompts", "negative_prompts"):
                for prompt in getattr(expert, key) or []:
                    lines.append(f"  - {key.split('_')[0]}: {json.dumps(prompt, ensure_ascii=False)}")
            for key in ("noise_scale", "residual_scale"):
                if getattr(expert, key) is not None:
                    lines.append(f"  - {key}: {getattr(expert, key)}")
    lines += ["", "## Configuration", "", *fenced(job.config_text, "yaml")]
    return "\n".join(lines)
