"""sha256 of the output shards of merge_models.py flag settings on a small fixture, written or checked.

Proves that a refactor keeps the bytes of every paper-named flag setting (average_merging, task_arithmetic,
ties_merging, each ± DARE random / magnitude / fine-tuned-weight, norm_adaptive, dare), in bfloat16 and
float32. The fixture (base + 3 fine-tunes, Llama layout, seeded) has tensors above 2^20 elements, so
the streamed-piece paths run too.

    .venv/bin/python scripts/flag_hashes.py --write hashes.txt     # before the change
    .venv/bin/python scripts/flag_hashes.py --check hashes.txt     # after it: exit 1 on any difference
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 256, 4608, 4500, 2   # mlp and embeddings: > 2^20 elements (streamed)

DARE_RANDOM = ["--drop_rate", "0.7"]
DARE_MAGNITUDE = ["--drop_rate", "0.7", "--mask_strategy", "magnitude"]
DARE_FINETUNED = ["--drop_rate", "0.3", "--weight_format", "finetuned_weight"]
# label → (uses the base, flags); paper-named settings must keep their bytes across refactors
PAPER_SETTINGS = {
    "average_merging": (False, ["--method", "average_merging"]),
    "average_merging weights": (False, ["--method", "average_merging", "--weights", "0.5", "0.3", "0.2"]),
    "task_arithmetic": (True, ["--method", "task_arithmetic", "--scaling_coefficient", "0.8"]),
    "task_arithmetic weights": (True, ["--method", "task_arithmetic", "--weights", "1.0", "0.5", "0.25"]),
    "ties_merging": (True, ["--method", "ties_merging", "--density", "0.2"]),
    "ties_merging weights-normalize": (True, ["--method", "ties_merging", "--density", "0.5", "--ties_normalize",
                                              "weights", "--scaling_coefficient", "0.9"]),
    "norm_adaptive": (True, ["--method", "norm_adaptive"]),
    "dare single": (True, ["--method", "dare", *DARE_RANDOM]),
    "task_arithmetic dare l1": (True, ["--method", "task_arithmetic", *DARE_RANDOM, "--rescale_mode", "l1"]),
    "task_arithmetic dare droponly": (True, ["--method", "task_arithmetic", *DARE_RANDOM, "--no_rescale"]),
}
for _method in ("average_merging", "task_arithmetic", "ties_merging"):
    _extra = ["--density", "0.5"] if _method == "ties_merging" else []
    for _label, _dare in (("random", DARE_RANDOM), ("magnitude", DARE_MAGNITUDE), ("finetuned", DARE_FINETUNED)):
        PAPER_SETTINGS[f"{_method} dare {_label}"] = (True, ["--method", _method, *_extra, *_dare])
# the mergekit-named flags: before issue 18 they ran the paper's functions (aliases); recorded to show the change
MERGEKIT_SETTINGS = {
    "linear": (False, ["--method", "linear"]),
    "ties": (True, ["--method", "ties", "--density", "0.5"]),
    "dare_ties": (True, ["--method", "dare_ties", "--density", "0.5"]),
    "dare_ties magnitude": (True, ["--method", "dare_ties", "--density", "0.5", "--mask_strategy", "magnitude"]),
    "dare_linear": (True, ["--method", "dare_linear", "--density", "0.5"]),
    "slerp": (True, ["--method", "slerp", "--slerp_t", "0.3"]),
}


def build_fixture(folder: Path, dtype_name: str) -> list[Path]:
    """base, ft0, ft1, ft2: seeded random Llama tensors (base ~ 0.02·N(0,1), fine-tunes + 1e-3·N(0,1))."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                       **{p + f"self_attn.{x}_proj.weight": (HIDDEN, HIDDEN) for x in "qkvo"},
                       p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
                       p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE)})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": dtype_name}
    folders = [folder / name for name in ("base", "ft0", "ft1", "ft2")]
    for index, target in enumerate(folders):
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text(json.dumps(config, indent=2))
        tensors = {}
        for tensor_index, (name, shape) in enumerate(shapes.items()):
            value = torch.randn(shape, generator=torch.Generator().manual_seed(tensor_index)) * 0.02
            if index:
                noise = torch.Generator().manual_seed(10_000 * index + tensor_index)
                value += torch.randn(shape, generator=noise) * 1e-3
            tensors[name] = value.to(dtype)
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return folders


def shard_hashes(folder: Path) -> str:
    """sha256 of every *.safetensors file of the output, joined in name order."""
    return " ".join(f"{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()}"
                    for p in sorted(folder.glob("*.safetensors")))


def run_settings(settings: dict, work: Path, threads: int) -> dict[str, str]:
    import merge_models

    results = {}
    for dtype_name in ("bfloat16", "float32"):
        base, *models = build_fixture(work / dtype_name, dtype_name)
        for label, (on_base, flags) in settings.items():
            out = work / "out" / f"{dtype_name}-{label.replace(' ', '_')}"
            inputs = ["--base_model", str(base), "--models", *map(str, models)] if on_base else \
                ["--models", *map(str, models)]
            if flags[1] in ("dare", "slerp"):   # single-model methods
                inputs = ["--base_model", str(base), "--models", str(models[0])]
            try:
                code = merge_models.main([*inputs, *flags, "--output_dir", str(out), "--no_progress", "--seed", "3",
                                          "--threads", str(threads), "--max_shard_size_gb", "0.01"])
            except SystemExit as refused:          # a setting the flags refuse (argparse's exit 2)
                code = refused.code
            results[f"{dtype_name} | {label}"] = shard_hashes(out) if code == 0 else f"exit {code}"
            print(f"{dtype_name} | {label}: {results[f'{dtype_name} | {label}'][:40]}…", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", help="write 'label = hashes' lines here")
    action.add_argument("--check", help="compare with a file written by --write; exit 1 on a difference")
    parser.add_argument("--mergekit_named", action="store_true",
                        help="also run the mergekit-named flag settings (their bytes changed on purpose in issue 18)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    settings = dict(PAPER_SETTINGS)
    if args.mergekit_named:
        settings.update(MERGEKIT_SETTINGS)
    with tempfile.TemporaryDirectory(prefix="flag-hashes-") as work:
        results = run_settings(settings, Path(work), args.threads)
    if args.write:
        Path(args.write).write_text("".join(f"{label} = {digest}\n" for label, digest in results.items()))
        return 0
    recorded = dict(line.rstrip("\n").split(" = ", 1) for line in Path(args.check).read_text().splitlines()
                    if " = " in line and not line.startswith("#"))
    differing = [label for label, digest in results.items() if label in recorded and recorded[label] != digest]
    unchecked = [label for label in results if label not in recorded]
    for label in differing:
        print(f"DIFFERENT: {label}")
    print(f"{len(results) - len(differing) - len(unchecked)} settings identical, {len(differing)} different, "
          f"{len(unchecked)} not recorded")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
