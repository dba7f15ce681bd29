"""Progress of a long loop for the sweep driver and its log, without progress bars.

A process that a sweep runs gets ``MERGELM_PROGRESS=<setting folder>/sweep_progress.json`` from the runner
(utils/sweeps/runner.py). Its loops then report through :class:`Meter` (the Trainer through
:func:`trainer_callback`):

* the progress file is rewritten atomically at most every ``WRITE_EVERY_S`` seconds:
  ``{"schema": "mergelm.progress/1", "pid", "setting_started", "updated", "stage", "step", "total", "unit",
  "rate" (units/s over the stage), "eta_s" (the stage's), "phase", "phases", "fraction" (of the whole
  call), "eta_total_s"}``. The driver's console line and ``sweep.py status`` read it;
* a line ``progress: <stage> 120/460 steps (26%), 1.3 steps/s, ETA 4m20s`` goes to stderr (the setting's
  log) at the first step of the process, then at most every ``LOG_EVERY_S`` seconds (over all stages: many
  short stages do not flood the log), and when a stage that logged a line ends.

A call that runs several equal parts (masks × seeds, candidate merges) says which one runs with
:func:`phase`; the fraction of the call done is then ``(phase + stage fraction) / phases`` and the call's
ETA extrapolates the time since the first phase. Without the variable every function here does nothing
(a run from the command line shows its tqdm bars instead). Standard library only: it is imported by
processes that must start fast.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

ENV = "MERGELM_PROGRESS"
STARTED_ENV = "MERGELM_PROGRESS_STARTED"   # when the runner started the call (seconds since the epoch)
FILE_NAME = "sweep_progress.json"
SCHEMA = "mergelm.progress/1"
WRITE_EVERY_S = 1.0
LOG_EVERY_S = float(os.environ.get("MERGELM_PROGRESS_LOG_EVERY", "30"))
T = TypeVar("T")

_phase: dict = {"index": None, "count": None, "label": None, "started": None}
_last_log = [float("-inf")]   # when this process last logged a progress line


def target() -> Path | None:
    """The progress file this process reports to, or None (not run by a sweep)."""
    value = os.environ.get(ENV)
    return Path(value) if value else None


def format_duration(seconds: float | None) -> str:
    """``35s``, ``4m20s``, ``1h02m``; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def phase(index: int, count: int, label: str | None = None) -> None:
    """The call is in part ``index`` (0-based) of ``count`` equal parts, e.g. mask 3 of 24."""
    if _phase["started"] is None:
        _phase["started"] = time.time()
    _phase.update(index=index, count=count, label=label)


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def describe(state: dict) -> str:
    """One compact line for a progress file's content: ``train mrpc 120/460 steps (26%), 1.3/s, ETA 4m20s``."""
    step, total, unit = state.get("step"), state.get("total"), state.get("unit") or "step"
    text = str(state.get("stage") or "running")
    if step is not None:
        text += f" {step}/{total if total else '?'} {plural(unit)}"
        if total:
            text += f" ({100 * step / total:.0f}%)"
    if state.get("rate"):
        text += f", {state['rate']:.3g} {plural(unit)}/s"
    if total and step is not None and step < total:
        text += f", ETA {format_duration(state.get('eta_s'))}"
    if state.get("phases"):
        text += f"; part {state['phase'] + 1}/{state['phases']}"
        if state.get("phase_label"):
            text += f" ({state['phase_label']})"
    if state.get("eta_total_s") is not None and (state.get("phases") or 0) > 1:
        text += f", call ETA {format_duration(state['eta_total_s'])}"
    return text


def read(path: str | os.PathLike) -> dict | None:
    """A progress file's content, or None (missing or being replaced)."""
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("schema") == SCHEMA else None


def write(path: Path, state: dict) -> None:
    """Atomic replace (a reader never sees half a file); errors are ignored: progress is best effort."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(state) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)


class Meter:
    """Counts the steps of one stage and reports them (see the module docstring); a no-op outside a sweep."""

    def __init__(self, stage: str, total: int | None, unit: str = "step", start: int = 0) -> None:
        self.path = target()
        self.stage, self.total, self.unit = stage, total, unit
        self.step = self.start = start   # a resumed loop starts past 0: its rate counts from `start`
        self.started = time.time()
        self.last_write = 0.0
        self.logged = False
        if self.path is not None:
            self._report(force_write=True)

    def update(self, steps: int = 1) -> None:
        self.set(self.step + steps)

    def set(self, step: int) -> None:
        self.step = step
        if self.path is not None:
            self._report()

    def close(self) -> None:
        if self.path is not None:
            self._report(force_write=True, force_log=self.logged and self.step > self.start)

    def state(self) -> dict:
        now = time.time()
        elapsed = max(now - self.started, 1e-9)
        rate = (self.step - self.start) / elapsed if self.step > self.start else None
        eta = (self.total - self.step) / rate if rate and self.total else None
        fraction = self.step / self.total if self.total else None
        state = {"schema": SCHEMA, "pid": os.getpid(), "setting_started": _float(os.environ.get(STARTED_ENV)),
                 "updated": now, "stage": self.stage, "step": self.step, "total": self.total, "unit": self.unit,
                 "rate": rate, "eta_s": eta, "phase": _phase["index"], "phases": _phase["count"],
                 "phase_label": _phase["label"], "fraction": fraction, "eta_total_s": eta}
        if _phase["count"]:
            done = (_phase["index"] + (fraction or 0.0)) / _phase["count"]
            spent = now - _phase["started"]
            state["fraction"] = done
            state["eta_total_s"] = spent * (1 - done) / done if done > 0 else None
        return state

    def _report(self, force_write: bool = False, force_log: bool = False) -> None:
        now = time.time()
        log = force_log or (now - _last_log[0] >= LOG_EVERY_S and self.step > self.start)
        if not (force_write or log or now - self.last_write >= WRITE_EVERY_S):
            return
        state = self.state()
        if force_write or now - self.last_write >= WRITE_EVERY_S:
            write(self.path, state)
            self.last_write = now
        if log:
            print(f"progress: {describe(state)}", file=sys.stderr, flush=True)
            _last_log[0], self.logged = now, True

    def __enter__(self) -> "Meter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable[T], stage: str, total: int | None = None, unit: str = "step") -> Iterator[T]:
    """Yield from ``iterable``, counting its items on a Meter (``total`` defaults to ``len(iterable)``)."""
    if target() is None:
        yield from iterable
        return
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Meter(stage, total, unit) as meter:
        for item in iterable:
            yield item
            meter.update()


def trainer_callback(stage: str = "train"):
    """A transformers TrainerCallback reporting the optimizer steps (``global_step / max_steps``) on a Meter;
    None outside a sweep (nothing to add to the Trainer)."""
    if target() is None:
        return None
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self) -> None:
            self.meter: Meter | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.meter = Meter(stage, state.max_steps, "step", start=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if self.meter is not None:
                self.meter.set(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.meter is not None:
                self.meter.close()

    return ProgressCallback()


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
