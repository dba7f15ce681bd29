"""Speed-up of evaluating several DARE settings of one model from one load (--weight_mask_rates / --seeds).

Runs the GLUE demo's DARE settings (configs/glue.yaml demo.drop_settings, the DARE entry: rates × mask
seeds on the demo's drop task) on an already fine-tuned demo checkpoint, three ways:
  processes: one `python inference_plms_glue.py` process per setting (a sweep without batch);
  calls:     one main(argv) call per setting in this process (weights loaded per setting);
  batched:   one main(argv) call with all rates and seeds (weights loaded once; what the sweep's batch does).
and prints the wall time of each, per setting, and the speed-ups. The batched metrics must equal the
per-setting ones (checked).

    python scripts/benchmark_drop_batch.py --save_dir save_glue_demo [--glue_dir DIR] [--skip_processes]
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
from utils.glue.data import load_glue_config  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--save_dir", default="save_glue_demo", help="the demo's output folder (with save_models/ and the model link)")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", str(REPO.parent / "shared" / "data" / "glue")), help="local GLUE folder")
    parser.add_argument("--config", default=None, help="GLUE config YAML (default: configs/glue.yaml)")
    parser.add_argument("--device", default="cpu", help="device of the evaluation")
    parser.add_argument("--skip_processes", action="store_true", help="do not time one process per setting")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    demo = load_glue_config(args.config)["demo"]
    variant = next(v for v in demo["drop_settings"] if v["name"] == "DARE")
    rates, seeds = variant["weight_mask_rate"], variant["seeds"]
    settings = [(rate, seed) for rate in rates for seed in seeds]
    save_dir = Path(args.save_dir)
    common = ["--language_model_name", str(save_dir / demo["language_model"]), "--dataset_names", demo["drop_task"], "--glue_dir", args.glue_dir,
              "--device", args.device, "--no_progress", "--batch_size", str(demo["batch_size"]), "--max_seq_length", str(demo["max_seq_length"]),
              "--max_eval_samples", str(demo["max_eval_samples"]), "--learning_rate", str(demo["learning_rate"]), "--use_weight_rescale",
              "--mask_strategy", variant["mask_strategy"], "--weight_format", variant["weight_format"]]
    common += ["--config", args.config] if args.config else []
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
            for rate, seed in settings:
                command = [sys.executable, str(REPO / "inference_plms_glue.py"), *common, "--weight_mask_rate", str(rate), "--seed", str(seed),
                           "--save_dir", str(folders["processes"])]
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            times["processes"] = time.perf_counter() - started
        started = time.perf_counter()
        for rate, seed in settings:
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
    print(f"\nGLUE demo DARE settings: {demo['language_model']} on {demo['drop_task']}, rates {rates} × seeds {seeds} "
          f"= {len(settings)} settings, {demo['max_eval_samples']} eval examples, device {args.device}")
    for way, seconds in times.items():
        print(f"  {way:9s} {seconds:7.1f} s total, {seconds / len(settings):6.2f} s per setting")
    print(f"  speed-up of batched: {times['calls'] / times['batched']:.2f}x over one call per setting"
          + (f", {times['processes'] / times['batched']:.2f}x over one process per setting" if "processes" in times else ""))
    print("  batched metrics identical to the per-setting calls: yes")
    return times


if __name__ == "__main__":
    main()
