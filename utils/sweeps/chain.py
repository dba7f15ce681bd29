"""A chain of sweeps run one after another (a demo): its stages, and an overall ETA while it runs.

Each stage declares the seconds it takes on an idle 2-core machine when all its settings run
(``expected_s``, measured once; a rough guide, not a promise). The ETA is

    (time left in the current stage) + Σ over later stages expected_s × (share of their settings still to run) × speed

where ``speed`` = seconds the finished stages took / their expected seconds (1 until a stage has finished),
and the time left in the current stage is extrapolated from its own progress (settings ended plus the
running settings' fractions, utils/progress.py) once 1% of it is done, else its expected seconds × speed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from utils.progress import format_duration


@dataclass(frozen=True)
class Stage:
    name: str
    expected_s: float          # all its settings, idle 2-core machine
    description: str = ""


class ChainProgress:
    def __init__(self, stages: list[Stage], label: str = "demo") -> None:
        self.stages = stages
        self.label = label
        self.todo: dict[str, tuple[int, int]] = {}   # stage -> (settings to run, settings)
        self.spent: dict[str, float] = {}            # finished stages' seconds
        self.current: int | None = None
        self.stage_started = self.started = time.time()

    def planned(self, name: str, to_run: int, total: int) -> None:
        self.todo[name] = (to_run, total)

    def expected(self, stage: Stage) -> float:
        to_run, total = self.todo.get(stage.name, (1, 1))
        return stage.expected_s * (to_run / total if total else 0.0)

    def speed(self) -> float:
        expected = sum(self.expected(s) for s in self.stages if s.name in self.spent)
        spent = sum(self.spent.values())
        return spent / expected if expected > 1.0 and spent > 1.0 else 1.0

    def begin(self, index: int) -> str:
        self.current, self.stage_started = index, time.time()
        stage = self.stages[index]
        to_run, total = self.todo.get(stage.name, (0, 0))
        return (f"{self.label}: stage {index + 1}/{len(self.stages)} {stage.name}: {stage.description} "
                f"({to_run} of {total} settings to run); overall ETA {format_duration(self.eta())}")

    def end(self, index: int) -> None:
        self.spent[self.stages[index].name] = time.time() - self.stage_started

    def eta(self, ended: int = 0, to_run: int = 0, fractions: list[float] | None = None) -> float:
        speed = self.speed()
        left = 0.0
        if self.current is not None:
            stage = self.stages[self.current]
            done = (ended + sum(fractions or [])) / to_run if to_run else 0.0
            elapsed = time.time() - self.stage_started
            if done >= 0.01:
                left = elapsed * (1 - done) / done
            else:
                left = max(0.0, self.expected(stage) * speed - elapsed)
        later = self.stages[(self.current + 1) if self.current is not None else 0:]
        return left + sum(self.expected(stage) * speed for stage in later)

    def line(self, ended: int, to_run: int, fractions: list[float]) -> str:
        """The console's overall line (RunOptions.overall)."""
        index = self.current or 0
        return (f"  {self.label}: stage {index + 1}/{len(self.stages)} {self.stages[index].name}, "
                f"{format_duration(time.time() - self.started)} elapsed, overall ETA {format_duration(self.eta(ended, to_run, fractions))}")
