r"""Evaluate one fine-tuned LLM, optionally after DARE, on AlpacaEval / GSM8K / MATH / HumanEval / MBPP.

The paper's command line runs unchanged, e.g.
    python inference_llms_instruct_math_code.py --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 \
        --tensor_parallel_size 1 --weight_mask_rate 0.9 --use_weight_rescale

With --weight_mask_rate p > 0 the streaming engine writes θ' = θ_pre + DARE(θ_ft − θ_pre) (or DARE(θ_ft)
with --weight_format finetuned_weight), DARE(x) = x ⊙ (1 − m) / (1 − p), m ~ Bernoulli(p) per entry
(no rescale without --use_weight_rescale; --mask_strategy magnitude drops the int(n·p) smallest |x|),
after the paper's vocabulary alignment (rows added for a pad token are set to the mean of the existing
rows). The checkpoint goes to <save_dir>/save_models/<dataset>/<save_name> and is removed after the
evaluation unless --keep_model. Unlike the original, --weight_mask_rate defaults to 0.0 (the model as is).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from utils.llm.generation import BACKEND_KINDS, resolve_backend_kind
from utils.llm.evaluation import EvalOptions, check_datasets, evaluate_model
from utils.llm.prompts import DATASETS, load_task_config, model_entry

MODEL_DIR_ENV = "MERGELM_MODEL_DIR"
_ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "intermediate_size", "rope_theta")
logger = logging.getLogger("mergelm.llm")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and shows defaults not already described in the help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class BackboneMismatchError(ValueError):
    """The fine-tuned model was not trained from the given backbone (architecture or RoPE differs)."""


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with merge_llms_instruct_math_code.py (data, slicing, backend, outputs)."""
    parser.add_argument("--start_index", type=int, default=0, help="first example (Python slice start)")
    parser.add_argument("--end_index", type=int, default=sys.maxsize, help="end of the slice (exclusive)")
    parser.add_argument("--tensor_parallel_size", type=int, default=1, help="GPUs per vLLM engine")
    parser.add_argument("--weight_format", default="delta_weight", choices=["finetuned_weight", "delta_weight"],
                        help="what DARE drops: the delta θ_ft − θ_pre, or θ_ft itself")
    parser.add_argument("--weight_mask_rate", type=float, default=0.0, help="DARE drop rate p in [0, 1)")
    parser.add_argument("--use_weight_rescale", action="store_true", help="rescale kept entries by 1 / (1 − p)")
    parser.add_argument("--mask_strategy", default="random", choices=["random", "magnitude"],
                        help="random: Bernoulli(p) drop; magnitude: drop the smallest |x|")
    parser.add_argument("--seed", type=int, default=0, help="seed of the DARE masks and of sampling")
    parser.add_argument("--backend", default="auto", choices=BACKEND_KINDS,
                        help="auto: vLLM when installed and a GPU is visible, else transformers")
    parser.add_argument("--batch_size", type=int, default=8, help="transformers backend: prompts per forward batch")
    parser.add_argument("--device", default="auto", help="transformers backend: auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="inference dtype (auto: float32 on CPU, the checkpoint's half dtype or float16 on GPU)")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="torch CPU threads of the transformers backend (the merge engine sets its own)")
    parser.add_argument("--max_tokens", type=int, default=None,
                        help="override the paper's max new tokens per dataset (quick runs only)")
    parser.add_argument("--data_dir", default=None,
                        help="folder with gsm8k_test.jsonl, MATH_test.jsonl, mbpp.test.jsonl "
                             "(default: $MATH_CODE_DATA_DIR, else ./math_code_data)")
    parser.add_argument("--alpaca_eval_path", default=None,
                        help="local AlpacaEval JSON (default: $ALPACA_EVAL_PATH, else the hub)")
    parser.add_argument("--model_dir", default=None,
                        help=f"folder searched first for models given by name (default: ${MODEL_DIR_ENV})")
    parser.add_argument("--save_dir", default=".", help="root of the output folders (save_models/, save_gen_*/, ...)")
    parser.add_argument("--keep_model", action="store_true", help="keep the DARE / merged checkpoint")
    parser.add_argument("--save_dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="dtype of the written checkpoint (default: the backbone's)")
    parser.add_argument("--merge_device", default="cpu", help="device of the streaming engine (cpu or cuda)")
    parser.add_argument("--code_timeout", type=float, default=3.0, help="seconds per HumanEval/MBPP program")
    parser.add_argument("--code_memory_mb", type=int, default=1024, help="address-space limit per program (MiB)")
    parser.add_argument("--code_workers", type=int, default=2, help="programs executed in parallel")
    parser.add_argument("--allow_backbone_mismatch", action="store_true",
                        help="proceed when the backbone's architecture or RoPE differs from the fine-tuned model's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--finetuned_model_name", default="WizardLM-13B-V1.2",
                        help="paper model name (see configs/llm_tasks.yaml), local folder or hub id")
    parser.add_argument("--pretrained_model_name", default=None,
                        help="backbone θ_pre (folder or hub id; default: the paper's backbone of the model)")
    parser.add_argument("--dataset_name", default="alpaca_eval", choices=list(DATASETS), help="benchmark")
    parser.add_argument("--wizardcoder_use_llama2_as_backbone", action="store_true",
                        help="paper's wrong-backbone experiment: Llama-2 as θ_pre of WizardCoder-Python-7B/13B")
    add_evaluation_arguments(parser)
    return parser


def model_label(name: str) -> str:
    """Name used in output folders: the name itself, or the last part of a path / hub id."""
    return re.sub(r"[^\w.+-]", "_", Path(name.rstrip("/")).name) or "model"


def resolve_model(name: str, model_dir: str | None = None) -> str:
    """A folder (``name`` itself, else ``<model_dir>/<name>``), else the hub id of a paper model name,
    else ``name`` as a hub id (``org/model``). Raises FileNotFoundError naming what was tried."""
    if Path(name).is_dir():
        return name
    folder = model_dir or os.environ.get(MODEL_DIR_ENV)
    if folder and (Path(folder) / name).is_dir():
        return str(Path(folder) / name)
    entry = model_entry(name)
    if entry is not None:
        if entry.hub_id:
            return entry.hub_id
        raise FileNotFoundError(f"model '{name}' has no hub release usable as is; put its folder under --model_dir "
                                f"(or ${MODEL_DIR_ENV}) or pass a path")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return name
    raise FileNotFoundError(f"model '{name}': not a folder, not under --model_dir/${MODEL_DIR_ENV}, not a paper "
                            f"model name and not a hub id (org/name)")


def _architecture(source: str) -> dict[str, Any]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    values = {name: getattr(config, name, None) for name in _ARCHITECTURE_FIELDS}
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if values["rope_theta"] is None and isinstance(rope, dict):
        values["rope_theta"] = rope.get("rope_theta")
    values["vocab_size"] = getattr(config, "vocab_size", None)
    return values


def check_backbone(finetuned: str, backbone: str, *, allow_mismatch: bool = False) -> dict[str, Any]:
    """Compare the configs of a fine-tuned model and its claimed backbone.

    Architecture fields and the RoPE base must be equal (a Code Llama model has rope_theta 1e6, Llama 2
    1e4), and the vocabularies may differ by at most 2 rows (the paper's pad-token alignment).
    Raises BackboneMismatchError naming the field and both values, unless ``allow_mismatch``.
    """
    tuned, base = _architecture(finetuned), _architecture(backbone)
    problems = [f"{name}: {tuned[name]} in {finetuned} vs {base[name]} in {backbone}"
                for name in _ARCHITECTURE_FIELDS if tuned[name] != base[name]]
    if tuned["vocab_size"] is not None and base["vocab_size"] is not None \
            and abs(tuned["vocab_size"] - base["vocab_size"]) > 2:
        problems.append(f"vocab_size: {tuned['vocab_size']} vs {base['vocab_size']} (more than the pad-token "
                        f"alignment can reconcile)")
    if problems and not allow_mismatch:
        raise BackboneMismatchError(
            f"{finetuned} does not look fine-tuned from {backbone}: " + "; ".join(problems)
            + ". Deltas against a different backbone are meaningless (e.g. a Code-Llama-based model against "
              "Llama 2); pass the right --pretrained_model_name, or --allow_backbone_mismatch to proceed anyway")
    for problem in problems:
        logger.warning("backbone mismatch allowed: %s", problem)
    return {"finetuned": tuned, "backbone": base, "mismatches": problems}


def dare_options(args: argparse.Namespace):
    from model_merging_methods import DareOptions

    return DareOptions(drop_rate=args.weight_mask_rate, rescale=args.use_weight_rescale,
                       strategy=args.mask_strategy, weight_format=args.weight_format)


def eval_options(args: argparse.Namespace, *, save_name: str, tasks: str | None, generator_name: str,
                 run_config: dict[str, Any]) -> EvalOptions:
    return EvalOptions(
        save_dir=args.save_dir, save_name=save_name, tasks=tasks, generator_name=generator_name,
        backend=args.backend, tensor_parallel_size=args.tensor_parallel_size, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, num_threads=args.num_threads, seed=args.seed,
        max_tokens=args.max_tokens, data_dir=args.data_dir, alpaca_eval_path=args.alpaca_eval_path,
        start_index=args.start_index, end_index=None if args.end_index == sys.maxsize else args.end_index,
        code_timeout=args.code_timeout, code_memory_mb=args.code_memory_mb, code_workers=args.code_workers,
        run_config=run_config)


@contextlib.contextmanager
def log_to(log_folder: Path) -> Iterator[Path]:
    """INFO to ``<log_folder>/<unix time>.log`` and to the console (the original's log layout)."""
    log_folder.mkdir(parents=True, exist_ok=True)
    path = log_folder / f"{time.time()}.log"
    root = logging.getLogger()
    previous_level = root.level
    root.setLevel(logging.INFO)
    formatter = logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    handlers = [logging.FileHandler(path, encoding="utf-8"), logging.StreamHandler()]
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.setLevel(logging.INFO)
        root.addHandler(handler)
    try:
        yield path
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(previous_level)


def inference_save_name(args: argparse.Namespace) -> str:
    """The original's name: ``<model>_inference_mask_<p>`` (+ ``_rescale_<bool>``, strategy, format, backbone)."""
    label = model_label(args.finetuned_model_name)
    if args.weight_mask_rate == 0.0:
        return f"{label}_inference_mask_{args.weight_mask_rate}"
    name = f"{label}_inference_mask_{args.weight_mask_rate}_rescale_{args.use_weight_rescale}"
    if args.mask_strategy == "magnitude":
        name += f"_strategy_{args.mask_strategy}"
    if args.weight_format == "finetuned_weight":
        name += f"_weight_format_{args.weight_format}"
    if args.wizardcoder_use_llama2_as_backbone:
        name += "_llama_2_as_backbone"
    return name


def _backbone_name(args: argparse.Namespace) -> str | None:
    if args.pretrained_model_name:
        return args.pretrained_model_name
    config = load_task_config()
    if args.wizardcoder_use_llama2_as_backbone:
        mapping = config["wizardcoder_llama2_backbones"]
        if args.finetuned_model_name not in mapping:
            raise ValueError(f"--wizardcoder_use_llama2_as_backbone applies to {sorted(mapping)}, "
                             f"not {args.finetuned_model_name}")
        return mapping[args.finetuned_model_name]
    entry = model_entry(args.finetuned_model_name, config)
    return entry.backbone if entry else None


def set_threads(num_threads: int | None) -> None:
    """Process-wide torch CPU threads (on a shared machine fewer threads than cores can be much faster)."""
    if num_threads is not None:
        if num_threads < 1:
            raise SystemExit(f"--num_threads must be >= 1, got {num_threads}")
        import torch

        torch.set_num_threads(num_threads)


def remove_checkpoint(folder: Path, root: Path) -> None:
    """Delete a written checkpoint and the folders above it (up to ``root``) that it leaves empty."""
    shutil.rmtree(folder, ignore_errors=True)
    parent, stop = folder.parent.resolve(), root.resolve()
    while parent != stop and stop in parent.parents and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def run_dare(args: argparse.Namespace, finetuned: str, backbone: str, output_dir: Path) -> dict[str, Any]:
    """DARE of one model by the streaming engine (method "dare", pad-row alignment); returns its manifest."""
    from utils.engine.streaming import StreamMergeJob, run_stream_merge

    job = StreamMergeJob(base_model=backbone, models=[finetuned], method="dare", output_dir=str(output_dir),
                         dare=dare_options(args), seed=args.seed, dtype=args.save_dtype, device=args.merge_device,
                         overwrite=True, vocab_alignment="pad_mean", files_from=finetuned, progress=False)
    return run_stream_merge(job)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.weight_mask_rate < 1.0:
        raise SystemExit(f"--weight_mask_rate must be in [0, 1), got {args.weight_mask_rate}")
    save_name = inference_save_name(args)
    with log_to(Path(args.save_dir) / "save_logs" / args.dataset_name / save_name) as log_path:
        return _run(args, save_name, log_path)


def _run(args: argparse.Namespace, save_name: str, log_path: Path) -> int:
    logger.info("configuration: %s", vars(args))
    set_threads(args.num_threads)
    finetuned = resolve_model(args.finetuned_model_name, args.model_dir)
    run_config: dict[str, Any] = {"arguments": vars(args), "finetuned_resolved": finetuned, "log": str(log_path),
                                  "backend_resolved": resolve_backend_kind(args.backend)}
    options = eval_options(args, save_name=save_name, tasks=None, generator_name=save_name, run_config=run_config)
    check_datasets([args.dataset_name], options)

    model_path, dare_folder = finetuned, None
    if args.weight_mask_rate > 0.0:
        backbone_name = _backbone_name(args)
        if backbone_name is None:
            raise SystemExit(f"--weight_mask_rate > 0 needs the backbone of {args.finetuned_model_name}: "
                             f"pass --pretrained_model_name")
        backbone = resolve_model(backbone_name, args.model_dir)
        allow = args.allow_backbone_mismatch or args.wizardcoder_use_llama2_as_backbone
        run_config["backbone_check"] = check_backbone(finetuned, backbone, allow_mismatch=allow)
        run_config["backbone_resolved"] = backbone
        dare_folder = Path(args.save_dir) / "save_models" / args.dataset_name / save_name
        started = time.perf_counter()
        manifest = run_dare(args, finetuned, backbone, dare_folder)
        run_config["dare_manifest"] = manifest
        run_config["dare_seconds"] = round(time.perf_counter() - started, 3)
        logger.info("DARE checkpoint written to %s in %.1f s", dare_folder, run_config["dare_seconds"])
        model_path = str(dare_folder)
    try:
        summaries = evaluate_model(model_path, [args.dataset_name], options)
    finally:
        if dare_folder is not None and not args.keep_model:
            remove_checkpoint(dare_folder, Path(args.save_dir))
            logger.info("removed %s (pass --keep_model to keep it)", dare_folder)
    logger.info("metrics: %s", json.dumps(summaries[0]["metrics"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
