"""Speed-up of evaluating several DARE settings of one model from one load (--weight_mask_rates / --seeds).

Runs the GLUE demo's DARE settings (configs/sweeps/minilm_mrpc_drop.yml, variant DARE, p > 0: rates × mask
seeds of the MRPC model) on the demo's fine-tuned checkpoint, three ways:
  processes: one `python inference_plms_glue.py` process per setting (a sweep without batch);
  calls:     one main(argv) call per setting in this process (weights loaded per setting);
  batched:   one main(argv) call with all rates and seeds (weights loaded once; the sweep's batch mode).
and prints the wall time of each, per setting, and the speed-ups. The batched metrics must equal the
per-setting ones (checked). Results go to a temporary folder (the demo's files are not touched).

    python scripts/benchmark_drop_batch.py [--save_dir save_glue_demo] [--glue_dir DIR] [--skip_processes] [--rates 0.5 0.9]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from inference_plms_glue import main as inference_main  # noqa: E402
from utils.cli import HelpFormatter  # noqa: E402
from utils.sweeps import expand, load_spec  # noqa: E402
from utils.sweeps.spec import flags_to_argv  # noqa: E402

SWEEP = REPO / "configs" / "sweeps" / "minilm_mrpc_drop.yml"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--save_dir", default="save_glue_demo", help="the demo's output folder (with save_models/ and the model link)")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR"), help="local GLUE folder (default: the sweep file's)")
    parser.add_argument("--device", default=None, help="device of the evaluation (default: the sweep file's)")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="evaluated examples (default: the sweep file's)")
    parser.add_argument("--skip_processes", action="store_true", help="do not time one process per setting")
    parser.add_argument("--rates", type=float, nargs="+", default=None, help="time only these of the sweep's DARE rates (a busy machine)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    save_dir = Path(args.save_dir)
    overrides = {"save_dir": str(save_dir), "language_model_name": str(save_dir / "all-MiniLM-L6-v2")}
    overrides.update({k: v for k, v in (("glue_dir", args.glue_dir), ("device", args.device), ("max_eval_samples", args.max_eval_samples))
                      if v is not None})
    settings = [s for s in expand(load_spec(SWEEP, overrides)) if s.labels.get("variant") == "DARE" and s.flags["weight_mask_rate"] > 0
                and (args.rates is None or s.flags["weight_mask_rate"] in args.rates)]
    if not settings:
        raise SystemExit(f"error: none of --rates {args.rates} is a DARE rate of {SWEEP}")
    rates = sorted({s.flags["weight_mask_rate"] for s in settings})
    seeds = sorted({s.flags["seed"] for s in settings})
    common = flags_to_argv({k: v for k, v in settings[0].flags.items() if k not in ("weight_mask_rate", "seed", "save_dir")})
    pairs = [(s.flags["weight_mask_rate"], s.flags["seed"]) for s in settings]
    with tempfile.TemporaryDirectory(prefix="drop_batch_") as scratch:
        # results go to scratch folders that see the demo's checkpoints (nothing of the demo is rewritten)
        folders = {}
        for way in ("processes", "calls", "batched"):
            folders[way] = Path(scratch) / way
            folders[way].mkdir()
            (folders[way] / "save_models").symlink_to((save_dir / "save_models").resolve(), target_is_directory=True)
        times, metrics = {}, {}
        if not args.skip_processes:
            started = time.perf_counter()
            for rate, seed in pairs:
                command = [sys.executable, str(REPO / "inference_plms_glue.py"), *common, "--weight_mask_rate", str(rate), "--seed", str(seed),
                           "--save_dir", str(folders["processes"])]
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            times["processes"] = time.perf_counter() - started
        started = time.perf_counter()
        for rate, seed in pairs:
            payload = inference_main([*common, "--weight_mask_rate", str(rate), "--seed", str(seed), "--save_dir", str(folders["calls"])])[0]
            metrics[(rate, seed)] = payload["metrics"]
        times["calls"] = time.perf_counter() - started
        started = time.perf_counter()
        batched = inference_main([*common, "--weight_mask_rates", *map(str, rates), "--seeds", *map(str, seeds), "--save_dir", str(folders["batched"])])
        times["batched"] = time.perf_counter() - started
    for payload in batched:
        key = (payload["config"]["weight_mask_rate"], payload["config"]["seed"])
        if payload["metrics"] != metrics[key]:
            raise SystemExit(f"error: batched metrics differ from the single call's at rate {key[0]}, seed {key[1]}")
    print(f"\nGLUE demo DARE settings ({SWEEP.name}): rates {rates} × seeds {seeds} = {len(pairs)} settings, "
          f"{settings[0].flags['max_eval_samples']} eval examples, device {settings[0].flags['device']}")
    for way, seconds in times.items():
        print(f"  {way:9s} {seconds:7.1f} s total, {seconds / len(pairs):6.2f} s per setting")
    print(f"  speed-up of batched: {times['calls'] / times['batched']:.2f}x over one call per setting"
          + (f", {times['processes'] / times['batched']:.2f}x over one process per setting" if "processes" in times else ""))
    print("  batched metrics identical to the per-setting calls: yes")
    return times


if __name__ == "__main__":
    main()
