"""Tokens per second of the transformers generation backend on SmolLM2-135M-Instruct (or any model folder).

Greedy decoding of GSM8K prompts in the paper's template; for each batch size the same number of prompts
is generated (after one warm-up call) and generated tokens / wall seconds are printed, where generated
tokens count every sequence up to its end-of-sequence token (``--ignore_eos`` forces full lengths).

    .venv/bin/python scripts/benchmark_generation.py --batch_sizes 1 8 --max_new_tokens 64 --num_threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.llm.generation import GenerationParams, TransformersBackend  # noqa: E402
from utils.llm.benchmarks import build_prompt  # noqa: E402
from utils.llm.smollm2 import ensure_smollm2  # noqa: E402

QUESTIONS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "A shop sells 1,200 pens a day. How many pens does it sell in 2 days?",
    "A train travels 60 miles per hour for 3 hours. How far does it go?",
    "Sara reads 12 pages a day. How many pages does she read in a week?",
    "A box holds 24 eggs. How many eggs are in 5 boxes?",
    "John had 50 dollars and spent 18. How much money is left?",
    "There are 7 rows of 9 chairs. How many chairs are there?",
    "A pizza has 8 slices and 3 friends eat 2 slices each. How many slices are left?",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, converted once)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    parser.add_argument("--num_prompts", type=int, default=8, help="prompts generated per batch size")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="new tokens per prompt (upper bound)")
    parser.add_argument("--ignore_eos", action="store_true", help="every prompt generates exactly --max_new_tokens "
                        "tokens (end-of-sequence suppressed)")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    args = parser.parse_args(argv)

    model = args.model or str(ensure_smollm2())
    prompts = [build_prompt("gsm8k", {"question": QUESTIONS[i % len(QUESTIONS)]}) for i in range(args.num_prompts)]
    results = []
    for batch_size in args.batch_sizes:
        backend = TransformersBackend(model, batch_size=batch_size, device=args.device, dtype=args.dtype,
                                      num_threads=args.num_threads)
        backend.generate(prompts[:1], GenerationParams(max_new_tokens=4))
        before = backend.stats.generated_tokens
        start = time.perf_counter()
        backend.generate(prompts, GenerationParams(max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos))
        seconds = time.perf_counter() - start
        tokens = backend.stats.generated_tokens - before
        results.append({"batch_size": batch_size, "prompts": len(prompts), "generated_tokens": tokens,
                        "seconds": round(seconds, 2), "tokens_per_second": round(tokens / seconds, 2),
                        **{key: value for key, value in backend.describe().items() if key != "batch_size"}})
        print(f"batch {batch_size:>3}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.2f} tokens/s "
              f"({backend.describe()['device']}, {backend.describe()['dtype']}, "
              f"{backend.describe()['torch_threads']} threads)", flush=True)
        backend.close()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
