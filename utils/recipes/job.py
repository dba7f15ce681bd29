"""Run a recipe file: validate every document, plan it (planner.py), run the plan through the one streaming
executor (utils/engine/streaming.execute_plan: each output tensor read, merged and written, large tensors in
flat pieces, so peak memory is a few pieces per worker whatever the tensor size), and write what a recipe's
output holds besides the weights: config.json, the tokenizer (built or copied), the model card, the recipe
and the manifest. Publishing is utils/records.write_folder_atomic (a staging folder renamed into place).
Multi-document recipes run in dependency order; a document's output goes to `intermediate_dir/<name>`
(reused when it was made from the same document text) and the last document's to `output_dir`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from model_merging_methods.options import DEFAULT_TIE_ORDER
from model_merging_methods.registry import get_method
from utils.cli import resolve_device
from utils.engine.allocator import tune_allocator
from utils.engine.reader import (CheckpointError, CheckpointReader, adapted_reader,
                                 resolve_checkpoint)
from utils.engine.streaming import Execution, execute_plan, global_norms
from utils.engine.writer import PlannedTensor
from utils.manifest import copy_model_files, hash_beside, input_record, run_manifest
from utils.records import OutputRefusedError, check_no_overlap, check_output_folder, write_folder_atomic

from .architecture import infer_layout, language_only, recipe_fates
from .card import model_card
from .planner import InputModel, Plan, output_config, plan_recipe, warn
from .schema import ModelRef, Recipe, RecipeError, load_recipe_file, run_order
from .tokenizer import Vocabulary, build_vocabulary, chat_template_text, permute_rows

SLOW_TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt",
                        "vocab.txt")
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", *SLOW_TOKENIZER_FILES}


@dataclass
class RecipeJob:
    config: str
    output_dir: str
    intermediate_dir: Optional[str] = None
    seed: int = 0
    device: str = "cpu"
    threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    max_shard_size: int = 5 * 2**30
    overwrite: bool = False
    allow_pickle: bool = False
    progress: bool = True
    tie_order: str = DEFAULT_TIE_ORDER   # rank cuts' ties (model_merging_methods/options.py TIE_ORDERS)
    merge_part: str = "all"        # "language": a multimodal model's other modules copied from the base


def run_recipe_job(job: RecipeJob, documents: Optional[tuple[list[Recipe], list[str]]] = None) -> list[dict]:
    """Validate the whole file (schema, names, references) before any tensor is read, then run each
    document; returns the manifests of the documents run (reused intermediates are skipped).
    `documents`: recipes already parsed (and their texts), e.g. merge_models.py's flags translated."""
    recipes, texts = documents if documents is not None else load_recipe_file(job.config)
    text_of = {id(r): t for r, t in zip(recipes, texts)}
    try:
        device = resolve_device(job.device)
    except ValueError as error:
        raise RecipeError(str(error)) from None
    ordered = run_order(recipes) if len(recipes) > 1 else recipes
    if len(recipes) > 1 and not job.intermediate_dir:
        raise RecipeError(f"{job.config}: a multi-document recipe needs --intermediate_dir (where the outputs of "
                          f"{', '.join(r.name for r in ordered[:-1])} go)")
    outputs = {r.name: Path(job.intermediate_dir) / r.name for r in ordered[:-1]} if len(recipes) > 1 else {}
    if Path(job.output_dir).exists() and not job.overwrite:
        raise RecipeError(f"output folder {job.output_dir} already exists; pass --overwrite to replace it")
    folders = _resolve_references(recipes, outputs, job)
    _check_outputs_are_not_inputs(job.output_dir, outputs, folders)
    manifests = []
    for recipe in ordered:
        target = outputs.get(recipe.name, Path(job.output_dir))
        if recipe.name in outputs and _reusable(target, text_of[id(recipe)], job.overwrite):
            print(f"reusing {target} for {recipe.name!r} (a finished merge of the same document)")
            folders[recipe.name] = target
            continue
        manifests.append(run_recipe(recipe, text_of[id(recipe)], target, folders, job, device,
                                    overwrite=job.overwrite))
        if recipe.name:
            folders[recipe.name] = target
    return manifests


def _check_outputs_are_not_inputs(output_dir: str, intermediates: dict[str, Path], folders: dict[str, Path]) -> None:
    """Refuse an output (or intermediate) folder that is, contains or lies inside an input model, even with
    --overwrite: replacing it would delete that input. Checked before anything is read."""
    targets = {"--output_dir": Path(output_dir), **{f"intermediate {name!r}": path for name, path in intermediates.items()}}
    try:   # the one output guard (utils/records.py); also a file or link at --output_dir, and outputs that overlap
        for role, target in targets.items():
            check_output_folder(target, {f"the input model {ref}": folder for ref, folder in folders.items()},
                                overwrite=True, role=role, advice="folder")
        if intermediates:
            check_no_overlap(next(iter(intermediates.values())).parent, {"--output_dir": output_dir},
                             role="--intermediate_dir", advice="--intermediate_dir", existing_only=False)
    except OutputRefusedError as error:
        raise RecipeError(str(error)) from None


def _reusable(folder: Path, text: str, overwrite: bool) -> bool:
    """An intermediate output is reused when its manifest records the same document text; a folder there
    that this tool did not make from that text is only replaced with --overwrite."""
    if not folder.exists():
        return False
    try:
        recorded = json.loads((folder / "merge_manifest.json").read_text())["recipe"]["text"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded == text:
        return True
    if not overwrite:
        why = "another recipe" if recorded is not None else "something else (no recipe manifest)"
        raise RecipeError(f"intermediate folder {folder} holds {why}; pass --overwrite to rebuild it")
    return False


def _resolve_references(recipes: list[Recipe], outputs: dict[str, Path], job: RecipeJob) -> dict[str, Path]:
    """Local folder or hub snapshot of every reference that is not an earlier document's name."""
    folders: dict[str, Path] = {}
    for recipe in recipes:
        for ref in recipe.referenced_models():
            parsed = ModelRef.parse(ref)
            if parsed.path in outputs or ref in folders:
                continue
            folders[ref] = resolve_reference(parsed, job.allow_pickle)
    return folders


def resolve_reference(ref: ModelRef, allow_pickle: bool) -> Path:
    if ref.revision is None or Path(ref.path).expanduser().is_dir():
        try:
            return resolve_checkpoint(ref.path, allow_pickle)
        except CheckpointError as error:
            message = " ".join(str(error).split()).removeprefix(f"{ref.path}: ")
            raise RecipeError(f"model {ref}: {message}") from None
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
        return Path(snapshot_download(ref.path, revision=ref.revision, allow_patterns=patterns))
    except Exception as error:  # network, auth, unknown repo or revision: reported the same way
        raise RecipeError(f"model {ref}: not a local folder, and fetching it from the Hugging Face hub failed "
                          f"({type(error).__name__}: {' '.join(str(error).split())})") from None


def _open(recipe: Recipe, folders: dict[str, Path], allow_pickle: bool) -> dict[str, InputModel]:
    inputs = {}
    for index, ref in enumerate(recipe.referenced_models()):
        folder = folders[ref] if ref in folders else folders[ModelRef.parse(ref).path]  # a document's name
        try:
            reader = CheckpointReader(folder, allow_pickle)
            adapter = ModelRef.parse(ref).adapter
            if adapter is not None:   # base+adapter: the LoRA is folded in per tensor as it is read
                reader = adapted_reader(reader, folder, ModelRef.parse(ref).path, adapter, allow_pickle)
        except CheckpointError as error:
            raise RecipeError(f"model {ref}: {error}") from None
        inputs[ref] = InputModel(ref, Path(folder), reader, infer_layout(folder, reader.names(), f"model {ref}"), index)
    return inputs


def run_recipe(recipe: Recipe, text: str, output: Path, folders: dict[str, Path], job: RecipeJob,
               device: torch.device, overwrite: bool) -> dict:
    """Plan one document (every check), then stream its merge into `output`; returns its manifest."""
    started = time.time()
    inputs = _open(recipe, folders, job.allow_pickle)
    configs = {ref: model.layout.config for ref, model in inputs.items()}
    vocabulary = build_vocabulary(recipe, {ref: m.folder for ref, m in inputs.items()}, configs)
    plan = plan_recipe(recipe, inputs, vocabulary.rows if vocabulary else None)
    copied = language_only(plan, inputs, recipe.base_model or plan.donor) if job.merge_part == "language" else []
    fates = recipe_fates(recipe, plan, inputs, copied)
    warn(plan.warnings)
    template = _chat_template(recipe, inputs)
    config = output_config(recipe, plan, inputs, vocabulary.rows if vocabulary else None)
    manifest: dict = {}

    def write(staging: Path) -> None:
        files, digests = hash_beside([path for model in inputs.values() for path in model.reader.weight_files()],
                                     lambda: _merge(recipe, plan, inputs, vocabulary, staging, job, device))
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_tokenizer(recipe, vocabulary, template, inputs[plan.donor].folder, staging)
        copied = copy_model_files(inputs[plan.donor].folder, staging)   # what a model needs; no input's records
        version = code_version()
        (staging / "README.md").write_text(model_card(recipe, text, output.name, version,
                                                       {r: _revision(m.folder) for r, m in inputs.items()}))
        (staging / "mergekit_config.yml").write_text(text)
        manifest.update(_manifest(recipe, text, plan, inputs, vocabulary, files, job, digests, copied, started))
        manifest["tensor_fates"] = fates
        (staging / "merge_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    tune_allocator()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)   # parallelism comes from job.threads workers merging different groups
    try:
        write_folder_atomic(output, write, overwrite=overwrite,
                            inputs={f"the input model {ref}": model.folder for ref, model in inputs.items()})
    except (FileExistsError, OutputRefusedError) as error:
        raise RecipeError(str(error)) from None
    finally:
        torch.set_num_threads(previous)
    return manifest


def _merge(recipe: Recipe, plan: Plan, inputs: dict[str, InputModel], vocabulary: Optional[Vocabulary],
           staging: Path, job: RecipeJob, device: torch.device) -> list[str]:
    """The recipe's plan through the one executor (utils/engine/streaming.execute_plan); a built vocabulary
    re-rows the inputs' embedding and lm_head tensors first."""
    method = get_method(recipe.merge_method)
    readers = {ref: model.reader for ref, model in inputs.items()}
    rows = (lambda group, tensors: permute_rows(vocabulary, tensors, group.base, group.name)) \
        if vocabulary is not None else None
    norms = None
    if method.global_norms and not all(g.per_input[ref].get("norm") is not None for g in plan.groups
                                       if not g.passthrough for ref in g.models):
        groups = [g for g in plan.groups if g.base is not None]
        position = {name: index for index, name in enumerate(inputs[groups[0].base].reader.names())} if groups else {}
        norms = global_norms(plan.groups, readers, device, rows,
                             order=lambda g: position.get(g.sources.get(g.base, ""), len(position)))
    execution = Execution(method, job.seed, device, job.threads, job.tie_order, job.max_shard_size, job.progress,
                          recipe.merge_method, plan.num_layers)
    files, _ = execute_plan(plan.groups, readers, {ref: model.index for ref, model in inputs.items()}, execution,
                            staging, rows, norms)
    return files


def _chat_template(recipe: Recipe, inputs: dict[str, InputModel]) -> Optional[str]:
    """The template `chat_template:` asks for; the inputs' tokenizers are loaded only to vote for `auto`."""
    if recipe.chat_template != "auto":
        return chat_template_text(recipe, [])
    from transformers import AutoTokenizer

    tokenizers = []
    for model in inputs.values():
        try:
            tokenizers.append(AutoTokenizer.from_pretrained(str(model.folder)))
        except Exception:  # inputs without a loadable tokenizer do not vote for `auto`
            continue
    return chat_template_text(recipe, tokenizers)


def _write_tokenizer(recipe: Recipe, vocabulary: Optional[Vocabulary], template: Optional[str], donor: Path,
                     staging: Path) -> None:
    """The built tokenizer; else the donor's re-saved with the requested chat template; else the donor's files."""
    tokenizer = vocabulary.tokenizer if vocabulary is not None else None
    if tokenizer is None and recipe.chat_template is not None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(donor))
        except Exception as error:
            raise RecipeError(f"chat_template: cannot load the tokenizer of {donor} ({error})") from None
    if tokenizer is None:
        for path in donor.iterdir():
            if path.is_file() and path.name in TOKENIZER_FILES:
                shutil.copyfile(path, staging / path.name)
        return
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(staging))
    # transformers 5 saves tokenizer.json only. The source's slow-format files stay valid because the output
    # only adds tokens on top of its vocabulary (listed in added_tokens.json below), so they are carried
    # over for the tools that read them (slow tokenizers, sentencepiece, GGUF converters, ...)
    source = vocabulary.source_folder if vocabulary is not None and vocabulary.source_folder else donor
    copied = [name for name in SLOW_TOKENIZER_FILES if (source / name).is_file() and not (staging / name).exists()]
    for name in copied:
        shutil.copyfile(source / name, staging / name)
    added = _added_beyond_core(tokenizer, source / "tokenizer.json")
    if copied and added and not (staging / "added_tokens.json").exists():
        # slow loaders read the tokens added on top of those files from here (transformers 5 does not write it)
        (staging / "added_tokens.json").write_text(json.dumps(added, indent=2, ensure_ascii=False) + "\n")


def _added_beyond_core(tokenizer, source_json: Path) -> dict[str, int]:
    """Token → id of the output's added tokens that the source's core vocabulary (tokenizer.json's model)
    lacks; {} when that file is missing or unreadable."""
    try:
        vocab = json.loads(source_json.read_text())["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    core = set(vocab) if isinstance(vocab, dict) else {entry[0] for entry in vocab}   # Unigram: [piece, score]
    return {token.content: index for index, token in sorted(tokenizer.added_tokens_decoder.items())
            if token.content not in core}


def _revision(folder: Path) -> Optional[str]:
    """The hub snapshot's commit when the folder is one (…/snapshots/<sha>), else None."""
    return folder.name if folder.parent.name == "snapshots" else None


def code_version() -> str:
    """This checkout's git commit (the library's version), or 'unknown' outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        return f"git {result.stdout.strip()}" if result.returncode == 0 and result.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _manifest(recipe: Recipe, text: str, plan: Plan, inputs: dict[str, InputModel], vocabulary: Optional[Vocabulary],
              files: list[str], job: RecipeJob, digests: dict, copied: dict, started: float) -> dict:
    method = get_method(recipe.merge_method)
    described = [input_record(ref, m.ref, m.folder, m.reader.weight_files(), digests, layers=m.layout.num_layers)
                 for ref, m in inputs.items()]
    return run_manifest(
        "merge_models --config (recipe, streaming engine)", started, described,
        recipe={"text": text, "resolved": recipe.model_dump(exclude_none=True)},
        method={"name": method.name, "semantics": "mergekit 0.1.5", "paper": method.paper,
                "randomized": method.randomized},
        arguments=asdict(job),
        seed=job.seed,
        output={"files": files, "num_tensors": len(plan.groups), "num_layers": plan.num_layers,
                "config_from": plan.donor, "vocab_rows": vocabulary.rows if vocabulary else None,
                "total_bytes": sum(PlannedTensor(g.name, g.dtype, g.shape).nbytes for g in plan.groups),
                "model_files": copied},
        warnings=plan.warnings,
    )
