"""Build a mixture-of-experts model (Mixtral, Qwen2-MoE or Qwen3-MoE layout) from homologous dense models.

The config uses mergekit-moe's keys (base_model, experts[{source_model, positive_prompts, negative_prompts,
noise_scale, residual_scale}], gate_mode, experts_per_token, shared_experts, dtype, architecture); see the
README section "Mixture of experts" and configs/moe/.

Example:
    python merge_moe.py configs/moe/qwen2_5_chat_code.yml --output_dir moe_out/
"""
from __future__ import annotations

import argparse
import sys

from utils.cli import HelpFormatter, positive_float, run_entry
from utils.engine.choices import DTYPE_NAMES


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("config", help="MoE config (YAML, mergekit-moe keys)")
    parser.add_argument("--output_dir", required=True, help="folder to create (written atomically)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]: where the hidden-state gates are computed")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                        help="output dtype; overrides the config's dtype (default: config, else the base's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of random gates and expert noise (with the tensor name)")
    parser.add_argument("--max_shard_size_gb", type=positive_float, default=5.0, help="output shard size in GiB")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="accept .bin checkpoints (torch.load with weights_only=True)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's; 1 is fastest on a busy machine)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def job_from_args(args: argparse.Namespace):
    from utils.moe import MoEJob, load_moe_config  # torch loads only after parsing (fast --help)

    config, text = load_moe_config(args.config)
    return MoEJob(config=config, config_text=text, output_dir=args.output_dir, seed=args.seed, dtype=args.dtype,
                  device=args.device, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                  max_shard_size=int(args.max_shard_size_gb * 2**30), progress=not args.no_progress,
                  config_path=args.config, threads=args.threads)


def precheck(args: argparse.Namespace) -> int | None:
    """Refusals before torch loads: the config's schema, its model folders, the output folder."""
    from utils.moe.config import MoEConfigError, load_moe_config
    from utils.precheck import model_source, output_folder, refused

    def check() -> None:
        config, _ = load_moe_config(args.config)
        roles = {"base_model": config.base_model,
                 **{f"experts[{i}]": expert.source_model for i, expert in enumerate(config.experts)},
                 **{f"shared_experts[{i}]": expert.source_model for i, expert in enumerate(config.shared_experts or [])}}
        for role, source in roles.items():
            model_source(source, f"{args.config}: {role}:")
        output_folder(args.output_dir, args.overwrite, {f"the {role} input": source for role, source in roles.items()})

    return refused("merge_moe.py", check, (MoEConfigError,))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = precheck(args)   # refused before torch loads
    if status is not None:
        return status
    from utils.engine.reader import CheckpointError
    from utils.moe import MoEConfigError, MoEError
    from utils.records import OutputExistsError

    return run_entry("merge_moe.py", lambda: _build(args), (MoEConfigError, MoEError, CheckpointError,
                                                            OutputExistsError), args.output_dir)


def _build(args: argparse.Namespace) -> int:
    from utils.moe import run_moe_build

    manifest = run_moe_build(job_from_args(args))
    output = manifest["output"]
    print(f"wrote {args.output_dir}: {manifest['architecture']['model_class']} with {len(manifest['experts'])} "
          f"experts ({output['num_tensors']} tensors, {output['total_bytes'] / 2**20:.1f} MiB, "
          f"{manifest['wall_seconds']:.1f} s); manifest: {args.output_dir}/merge_manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
