"""Plan, run and inspect a sweep: expansion, flag check, resume, batching into blocks, launch, status.

Resume: a setting is done when its record (``<folder>/sweep_record.json``) says ``done`` and the
recorded resolved config equals the one the script's parser gives now; done settings are skipped unless
``force``. Any other setting (no record, failed, interrupted, or a changed flag/default) runs again.

While `run` runs, SIGINT / SIGTERM are forwarded to the running settings' processes (utils/sweeps/runner.py);
their records say ``interrupted``, nothing more starts, and `run` raises :class:`SweepInterrupted` (scripts
exit 128 + the signal: 130 / 143). A console line per running setting shows its progress (utils/progress.py).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from utils import progress
from utils.sweeps import launchers, runner
from utils.sweeps.parsing import resolve
from utils.sweeps.runner import Block, SettingRun, lock_is_held, record_path
from utils.sweeps.spec import Setting, SweepError, SweepSpec, expand, flags_to_argv, load_spec

STATES = ("done", "running", "pending", "failed", "interrupted")


class SweepInterrupted(Exception):
    """`run` was stopped by a signal; the running settings were stopped and recorded as interrupted."""

    def __init__(self, signum: int, sweep_plan: "Plan"):
        super().__init__(f"sweep '{sweep_plan.spec.name}' interrupted by {signal.Signals(signum).name}")
        self.signum, self.plan = signum, sweep_plan

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@dataclass
class PlannedSetting:
    setting: Setting
    resolved_config: dict[str, Any]
    argv: list[str]
    state: str = "pending"  # done / failed / interrupted / stale / running / pending
    record: dict | None = None

    def progress(self) -> dict | None:
        """The running call's last progress report (utils/progress.py), None when there is none."""
        return progress.read(Path(self.setting.folder) / progress.FILE_NAME)


@dataclass
class Plan:
    spec: SweepSpec
    root: Path
    settings: list[PlannedSetting] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Settings per state: done, running (its lock is held by a process), pending (stale ones included),
        failed, interrupted."""
        counts = dict.fromkeys(STATES, 0)
        for item in self.settings:
            counts[item.state if item.state in counts else "pending"] += 1
        return counts


def read_record(folder: Path) -> dict | None:
    """The setting's record, or None when there is none or it is not a JSON object (damaged, or written by
    something else: the setting then counts as not done and runs again)."""
    path = record_path(folder)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def plan(spec_path: str | Path, output_root: str | Path | None = None, overrides: dict | None = None) -> Plan:
    """Expand the sweep (``overrides``: fixed flags set from the command line), check every setting with
    the script's parser, and read existing records."""
    spec = load_spec(spec_path, overrides)
    settings = expand(spec, output_root)
    root = Path(output_root if output_root is not None else spec.output_root)
    result = Plan(spec, root)
    cache: dict = {}
    for setting in settings:
        argv = setting.argv(spec.output_flag)
        flags = dict(setting.flags)
        if spec.output_flag:
            flags[spec.output_flag] = str(setting.output_folder)
        where = f"sweep '{spec.name}' setting {setting.id} ({_describe(setting)})"
        resolved = resolve(spec.module(), flags, where, cache)
        item = PlannedSetting(setting, resolved, argv)
        record = read_record(setting.folder)
        if lock_is_held(setting.folder):
            item.record, item.state = record, "running"
        elif record is not None:
            item.record = record
            if record.get("status") == "done":
                item.state = "done" if record.get("resolved_config") == resolved else "stale"
            elif record.get("status") in ("failed", "interrupted"):
                item.state = record["status"]
        elif (Path(setting.folder) / progress.FILE_NAME).exists():
            item.state = "interrupted"   # it started, and its driver was killed before it could write a record
        result.settings.append(item)
    if spec.batch:
        _check_batch_flags(spec, result, cache)
    return result


def _describe(setting: Setting) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.varying.items()) or setting.id


def _check_batch_flags(spec: SweepSpec, sweep_plan: Plan, cache: dict) -> None:
    """The script must have each batch list flag (checked on one batched call)."""
    first = sweep_plan.settings[0].setting
    flags = {**first.flags, **{list_flag: [first.flags[flag]] for flag, list_flag in spec.batch.items()}}
    resolve(spec.module(), flags, f"sweep '{spec.name}' batch {spec.batch}", cache)


def product_blocks(points: list[tuple], axes: int) -> list[list[list]]:
    """Partition distinct value tuples into blocks that are full Cartesian products.

    Returns, per block, the list of values of each axis; the blocks' products are disjoint and cover
    ``points`` exactly (so one batched call per block runs each setting once)."""
    if axes == 1:
        return [[sorted({point[0] for point in points}, key=_order)]]
    rests: dict[Any, set] = {}
    for point in points:
        rests.setdefault(point[0], set()).add(point[1:])
    clusters: dict[frozenset, list] = {}
    for value, rest in rests.items():
        clusters.setdefault(frozenset(rest), []).append(value)
    blocks = []
    for rest, firsts in clusters.items():
        for sub in product_blocks(sorted(rest, key=_order), axes - 1):
            blocks.append([sorted(firsts, key=_order), *sub])
    return blocks


def _order(value):
    return json.dumps(value, sort_keys=True, default=str)


def make_blocks(spec: SweepSpec, items: list[PlannedSetting], cwd: str) -> list[Block]:
    """One block per setting, or (with ``batch``) one per product of batched values sharing other flags."""
    def single(item: PlannedSetting) -> SettingRun:
        return SettingRun(item.setting.id, str(item.setting.folder), item.setting.flags, item.setting.labels,
                          item.argv, item.resolved_config)

    if not spec.batch:
        return [Block(spec.name, spec.module(), item.argv, [single(item)], cwd) for item in items]
    batched = list(spec.batch)
    groups: dict[str, list[PlannedSetting]] = {}
    for item in items:
        rest = {k: v for k, v in item.setting.flags.items() if k not in batched}
        groups.setdefault(_order(rest), []).append(item)
    blocks = []
    for members in groups.values():
        decoded = {_order(m.setting.flags[flag]): m.setting.flags[flag] for m in members for flag in batched}
        by_point = {tuple(_order(m.setting.flags[flag]) for flag in batched): m for m in members}
        for block_axes in product_blocks(list(by_point), len(batched)):
            covered = [by_point[point] for point in itertools.product(*block_axes)]
            first = covered[0].setting
            flags = {k: v for k, v in first.flags.items() if k not in batched}
            for flag, axis_values in zip(batched, block_axes):
                flags[spec.batch[flag]] = [decoded[value] for value in axis_values]
            blocks.append(Block(spec.name, spec.module(), flags_to_argv(flags), [single(m) for m in covered], cwd))
    return blocks


@dataclass
class RunOptions:
    launcher: str = "local"
    force: bool = False
    workers: int | None = None
    slurm: launchers.SlurmOptions | None = None
    ray_address: str | None = None
    ray_num_cpus: float | None = None
    ray_num_gpus: float | None = None
    ray_local_cpus: int | None = None
    dry_run: bool = False
    overrides: dict | None = None
    progress_every: float | None = None   # seconds between console progress lines (default: 1 on a terminal, else 30)
    # called at every console tick with (settings ended, settings to run, running settings' fractions done):
    # a line to show after the settings' lines (a chain of sweeps' overall ETA), or None
    overall: Callable[[int, int, list[float]], str | None] | None = None


def run(spec_path: str | Path, options: RunOptions, output_root: str | Path | None = None, echo=print) -> Plan:
    """Run the sweep's settings that are not done (all with ``force``); returns the updated plan."""
    sweep_plan = plan(spec_path, output_root, options.overrides)
    spec = sweep_plan.spec
    todo = [item for item in sweep_plan.settings if options.force or item.state != "done"]
    skipped = len(sweep_plan.settings) - len(todo)
    blocks = make_blocks(spec, todo, os.getcwd())
    echo(f"sweep {spec.name}: {len(sweep_plan.settings)} settings, {skipped} done and skipped, {len(todo)} to run "
         f"in {len(blocks)} call(s) ({options.launcher})")
    if options.dry_run or not blocks:
        for block in blocks:
            echo(f"  python {spec.script} " + " ".join(block.argv))
        return sweep_plan
    by_id = {item.setting.id: item for item in sweep_plan.settings}
    console = Console(echo, [item for item in todo], options.progress_every, options.overall)

    def report(records: list[dict]) -> None:
        for record in records:
            console.finished(record["id"])
            item = by_id[record["id"]]
            if record["status"] == "running":   # its lock is held: another run (or an orphan) runs it now
                item.state = "running"
                echo(f"  running {record['id']} {_describe(item.setting)}: {record['error']}; not started again")
                continue
            item.record, item.state = record, record["status"]
            line = f"  {record['status']:6s} {record['id']} {_describe(item.setting)} ({record['wall_time_s']:.1f} s)"
            if record["status"] != "done":
                last = (record["error"] or "").strip().splitlines()
                line += f", exit status {record['exit_status']}" + (f": {last[-1]}" if last else "")
            console.echo(line)

    with sweep_lock(sweep_plan.root, spec.name), forwarded_signals(console.echo), console.running():
        _launch(sweep_plan, blocks, options, report, echo)
    signum = runner.stop_requested()
    if signum is not None:
        raise SweepInterrupted(signum, sweep_plan)
    return sweep_plan


@contextlib.contextmanager
def forwarded_signals(echo=print):
    """Within the block, SIGINT / SIGTERM stop the sweep: forwarded to the running settings' process groups
    (runner.stop_children); a second signal kills them. Only the main thread can install handlers; elsewhere
    (a driver run from a thread) nothing changes."""
    runner.reset_stop()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        count = runner.stop_children(signum)
        name = signal.Signals(signum).name
        if runner._Children.hard:
            echo(f"sweep: second {name}: killing {count} running setting(s)")
        else:
            echo(f"sweep: {name}: stopping {count} running setting(s) (they are recorded as interrupted; "
                 f"a second signal kills them); nothing new starts")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Console:
    """One line per running setting with its progress (read from its progress file): redrawn in place every
    second on a terminal, printed every ``every`` seconds (default 30) otherwise (a log). A setting counts
    as running once its progress file was written after this run started and until its record comes."""

    def __init__(self, echo, items: list[PlannedSetting], every: float | None = None, overall=None) -> None:
        self.print = echo
        self.overall = overall
        self.items = {item.setting.id: item for item in items}
        self.done: set[str] = set()
        self.tty = echo is print and sys.stdout.isatty()
        self.every = every if every is not None else (1.0 if self.tty else 30.0)
        self.started = time.time()
        self.lock = threading.Lock()
        self.drawn = 0   # live lines on the terminal now
        self.stop_event = threading.Event()

    def finished(self, setting_id: str) -> None:
        self.done.add(setting_id)

    def echo(self, line: str) -> None:
        with self.lock:
            self._clear()
            self.print(line)

    def lines(self) -> list[str]:
        lines, fractions = [], []
        for setting_id, item in self.items.items():
            if setting_id in self.done:
                continue
            state = item.progress()
            if not state or (state.get("setting_started") or 0) < self.started - 1:
                continue
            elapsed = time.time() - (state.get("setting_started") or self.started)
            fractions.append(state.get("fraction") or 0.0)
            lines.append(f"  running {setting_id} {_describe(item.setting)} [{progress.format_duration(elapsed)}]: "
                         f"{progress.describe(state)}")
        if self.overall is not None:
            extra = self.overall(len(self.done), len(self.items), fractions)
            if extra:
                lines.append(extra)
        return lines

    def tick(self) -> None:
        lines = self.lines()
        with self.lock:
            self._clear()
            if self.tty:
                width = _terminal_width()
                text = "\n".join(line[:width - 1] for line in lines)
                if text:
                    sys.stdout.write(text + "\n")
                    sys.stdout.flush()
                self.drawn = len(lines)
            else:
                for line in lines:
                    self.print(line)

    def _clear(self) -> None:
        if self.tty and self.drawn:
            sys.stdout.write("\x1b[1A\x1b[2K" * self.drawn)
            sys.stdout.flush()
            self.drawn = 0

    @contextlib.contextmanager
    def running(self):
        thread = threading.Thread(target=self._loop, name="sweep-console", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop_event.set()
            thread.join()
            with self.lock:
                self._clear()

    def _loop(self) -> None:
        while not self.stop_event.wait(self.every):
            try:
                self.tick()
            except Exception:   # the console is best effort: never let it end the sweep
                pass


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((120, 24)).columns


def sweep_lock(root: Path, name: str):
    """The sweep's lock, ``<root>/.sweep-<name>.lock``: a second `run` of the same sweep while one is
    running is refused. An flock, so a killed driver cannot keep it (its settings' own locks, held by
    their processes, keep an orphaned setting from being run twice: utils/sweeps/runner.py)."""
    from utils.sweeps.runner import held_lock

    root.mkdir(parents=True, exist_ok=True)
    path = root / f".sweep-{name}.lock"
    lock = held_lock(path)
    if lock is None:
        raise SweepError(f"sweep '{name}' is already running (another `run` holds {path}); wait for it, or "
                         f"use `status` to see how far it got")
    return lock


def _launch(sweep_plan: Plan, blocks: list[Block], options: RunOptions, report, echo) -> None:
    spec = sweep_plan.spec
    if options.launcher == "local":
        launchers.run_local(blocks, options.workers or spec.local.workers, report)
    elif options.launcher == "slurm":
        slurm = (options.slurm or launchers.SlurmOptions()).over(spec.slurm)
        folder = sweep_plan.root / ".submitit"
        ids = launchers.run_slurm(blocks, slurm, folder, spec.name, report)
        echo(f"submitted {len(ids)} job(s): {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}; logs in {folder}")
    elif options.launcher == "ray":
        launchers.run_ray(blocks, options.ray_address if options.ray_address is not None else spec.ray.address,
                          options.ray_num_cpus if options.ray_num_cpus is not None else spec.ray.num_cpus,
                          options.ray_num_gpus if options.ray_num_gpus is not None else spec.ray.num_gpus, report,
                          local_cpus=options.ray_local_cpus)
    else:
        raise SweepError(f"unknown launcher '{options.launcher}' (local, slurm, ray)")


def status_text(sweep_plan: Plan, lines: int = 5) -> str:
    """Counts per state, then a line per running setting (its progress and ETA, when it reports one) and the
    last log lines of every failed or interrupted setting."""
    counts = sweep_plan.counts()
    stale = sum(item.state == "stale" for item in sweep_plan.settings)
    summary = ", ".join(f"{counts[state]} {state}" for state in STATES)
    out = [f"sweep {sweep_plan.spec.name} ({sweep_plan.root}): {len(sweep_plan.settings)} settings: {summary}"
           + (f" ({stale} of the pending done with a different resolved config)" if stale else "")]
    for item in sweep_plan.settings:
        if item.state == "running":
            state = item.progress()
            line = f"running {item.setting.id} [{_describe(item.setting)}]"
            if state:
                age = time.time() - (state.get("updated") or time.time())
                since = state.get("setting_started")
                line += (f" for {progress.format_duration(time.time() - since)}" if since else "")
                line += f": {progress.describe(state)} (reported {progress.format_duration(age)} ago)"
            out.append(line)
    for item in sweep_plan.settings:
        if item.state in ("failed", "interrupted"):
            record = item.record or {}
            if not record:
                out.append(f"interrupted {item.setting.id} [{_describe(item.setting)}]: started, no record (its "
                           f"driver was killed); log {Path(item.setting.folder) / runner.LOG_NAME}")
                continue
            out.append(f"{item.state} {item.setting.id} [{_describe(item.setting)}] exit status {record.get('exit_status')}, "
                       f"log {record.get('log')}:")
            error = str(record.get("error") or "").rstrip().splitlines()[-lines:]
            out += [f"    {line}" for line in error]
    return "\n".join(out)
