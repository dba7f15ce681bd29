"""Run a sweep declared in YAML (configs/sweeps/*.yml), or show how far it got.

    python scripts/sweep.py run configs/sweeps/minilm_mrpc_drop.yml [--launcher local|slurm|ray] [--force]
    python scripts/sweep.py status configs/sweeps/minilm_mrpc_drop.yml

Every setting (a point of the sweep's axes × seeds) has a stable id (hash of its flags) and a folder
<output_root>/<id> holding sweep_record.json (resolved config, status, exit status, last lines of a
failure) and sweep_log.txt. `run` checks every setting's flags with the script's own parser first, skips
settings already done with the same resolved config (--force reruns them), and keeps going when a
setting fails (exit status 1 at the end). While it runs, one console line per running setting shows its
progress and ETA (every 30 s in a log, redrawn on a terminal; each setting's log has them too); `status`
tells done / running (with progress and ETA) / pending / failed / interrupted settings apart. Ctrl-C or
SIGTERM stops the running settings (forwarded to them; a second signal kills them), records them as
interrupted and exits 130 / 143; `run` again resumes. Relative paths in the sweep's flags are relative to the
current directory, as on the command line. See docs/sweeps.md and utils/sweeps/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from utils.cli import HelpFormatter, error_line  # noqa: E402
from utils.sweeps import RunOptions, SlurmOptions, SweepError, SweepInterrupted, parse_overrides, plan, run, status_text  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the settings that are not done", formatter_class=HelpFormatter)
    status_parser = commands.add_parser("status", help="done / failed / pending counts and failures' last lines", formatter_class=HelpFormatter)
    for sub in (run_parser, status_parser):
        sub.add_argument("sweep", help="sweep YAML file")
        sub.add_argument("--output_root", default=None, help="folder of the settings' folders (default: the sweep's output_root)")
        sub.add_argument("--set", action="append", default=None, metavar="FLAG=VALUE",
                         help="set a fixed flag of the script (value read as YAML; repeatable), e.g. --set save_dir=runs")
    status_parser.add_argument("--lines", type=int, default=5, help="last log lines shown per failure")
    run_parser.add_argument("--launcher", choices=["local", "slurm", "ray"], default="local", help="where settings run")
    run_parser.add_argument("--force", action="store_true", help="rerun settings that are already done")
    run_parser.add_argument("--dry_run", action="store_true", help="print the calls without running them")
    run_parser.add_argument("--workers", type=int, default=None, help="local: settings run at once (default: the sweep's, else the CPU count)")
    run_parser.add_argument("--progress_every", type=float, default=None,
                            help="seconds between console progress lines (default: redrawn every second on a terminal, else 30)")
    slurm = run_parser.add_argument_group("slurm (submitit; defaults from the sweep's 'slurm' section)")
    slurm.add_argument("--partition", default=None, help="SLURM partition")
    slurm.add_argument("--gpus", type=int, default=None, help="GPUs per setting")
    slurm.add_argument("--cpus", type=int, default=None, help="CPUs per setting")
    slurm.add_argument("--mem_gb", type=float, default=None, help="memory per setting (GB)")
    slurm.add_argument("--time_min", type=int, default=None, help="time limit per setting (minutes)")
    slurm.add_argument("--array_parallelism", type=int, default=None, help="array tasks running at once")
    slurm.add_argument("--slurm_cluster", choices=["slurm", "local", "debug"], default="slurm",
                       help="slurm, or submitit's local / debug executors (no SLURM needed)")
    slurm.add_argument("--wait", action="store_true", help="wait for the jobs and report each (default: return after submitting)")
    ray = run_parser.add_argument_group("ray (defaults from the sweep's 'ray' section)")
    ray.add_argument("--ray_address", default=None, help="existing cluster (host:port, ray://host:port, auto); default: start a local Ray")
    ray.add_argument("--ray_num_cpus", type=float, default=None, help="CPUs per setting")
    ray.add_argument("--ray_num_gpus", type=float, default=None, help="GPUs per setting")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "status":
            print(status_text(plan(args.sweep, args.output_root, parse_overrides(args.set)), lines=args.lines))
            return 0
        options = RunOptions(
            launcher=args.launcher, force=args.force, workers=args.workers, dry_run=args.dry_run,
            slurm=SlurmOptions(partition=args.partition, gpus_per_node=args.gpus, cpus_per_task=args.cpus,
                               mem_gb=args.mem_gb, timeout_min=args.time_min, array_parallelism=args.array_parallelism,
                               cluster=None if args.slurm_cluster == "slurm" else args.slurm_cluster, wait=args.wait),
            ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus, ray_num_gpus=args.ray_num_gpus,
            overrides=parse_overrides(args.set), progress_every=args.progress_every)
        result = run(args.sweep, options, args.output_root)
    except SweepError as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return 2
    except SweepInterrupted as stopped:
        print(status_text(stopped.plan))
        print(f"{stopped}; run the same command again to resume", file=sys.stderr)
        return stopped.exit_status
    counts = result.counts()
    print(status_text(result))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
