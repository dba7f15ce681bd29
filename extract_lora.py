r"""Extract a PEFT LoRA adapter from a fine-tune: low-rank factors of each module's M − B, one module at a time.

Per-module rank: min(--rank, number of singular values > --sv_epsilon) (either bound alone works). Embeddings
and lm_head (tied included) get LoRA factors or are saved in full (--embeddings); changed norms and biases
are saved in full as modules_to_save (a LoRA module's bias as lora_B.bias), skipped, or refused
(--non_lora). Writes the adapter folder and extract_report.json (rank and reconstruction error per module
and in total). docs/lora.md has the details and the comparison with mergekit-extract-lora.

Example:
    python extract_lora.py --base base/ --model finetuned/ --output_dir lora/ --rank 32
    python extract_lora.py --base base/ --model finetuned/ --output_dir lora/ --rank 128 --sv_epsilon 0.01

Exit status: 0 written; 2 bad input (one line; nothing written); 130 / 143 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from utils.cli import HelpFormatter, run_entry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--base", required=True, help="base checkpoint: folder, hub id or base+adapter")
    parser.add_argument("--model", required=True, help="fine-tuned checkpoint: folder, hub id or base+adapter")
    parser.add_argument("--output_dir", required=True, help="adapter folder to create (written atomically)")
    parser.add_argument("--rank", type=int, default=None, help="most directions kept per module")
    parser.add_argument("--sv_epsilon", type=float, default=None, help="keep singular values > this")
    parser.add_argument("--embeddings", choices=["lora", "full", "skip"], default="lora",
                        help="embeddings and lm_head: LoRA factors, saved in full (modules_to_save), or left out")
    parser.add_argument("--non_lora", choices=["save", "skip", "refuse"], default="save",
                        help="changed norms / biases / other tensors: saved in full, left out, or an error")
    parser.add_argument("--include_regex", nargs="+", default=[], help="extract only modules matching one of these")
    parser.add_argument("--exclude_regex", nargs="+", default=[], help="leave out modules matching any of these")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="dtype of the factors (default: the fine-tune's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    return parser


def precheck(args: argparse.Namespace) -> int | None:
    """Refusals before torch loads: local checkpoint folders that do not exist, the output folder."""
    from utils.precheck import model_source, output_folder, refused

    def check() -> None:
        model_source(args.base, "--base")
        model_source(args.model, "--model")
        output_folder(args.output_dir, args.overwrite, {"--base": args.base, "--model": args.model})

    return refused("extract_lora.py", check)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    status = precheck(args)   # refused before torch loads
    if status is not None:
        return status
    from utils.engine.reader import CheckpointError
    from utils.lora.extract import ExtractJob, extract_lora

    def work() -> int:
        report = extract_lora(ExtractJob(args.base, args.model, args.output_dir, args.rank, args.sv_epsilon,
                                         args.embeddings, args.non_lora, args.include_regex, args.exclude_regex,
                                         args.dtype, args.overwrite))
        total = report["total"]
        print(f"extracted {total['lora_modules']} LoRA modules (rank ≤ {report['rank']}) and {total['full_tensors']} "
              f"full tensors into {args.output_dir}; relative reconstruction error {total['relative_error']:.4g}")
        return 0

    return run_entry("extract_lora.py", work, (CheckpointError,), args.output_dir)


if __name__ == "__main__":
    sys.exit(main())
