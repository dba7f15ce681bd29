"""Issue 26 item 1: progress reports (utils/progress.py) and a chain of sweeps' overall ETA (utils/sweeps/chain.py)."""
from __future__ import annotations

import json

import pytest

from utils import progress
from utils.sweeps import chain as chain_module
from utils.sweeps.chain import ChainProgress, Stage


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(chain_module.time, "time", fake)
    return fake


def test_format_duration():
    assert [progress.format_duration(s) for s in (0, 35.4, 60, 260, 3600 + 125, None, float("inf"))] == \
        ["0s", "35s", "1m00s", "4m20s", "1h02m", "?", "?"]


def test_meter_is_silent_outside_a_sweep(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert list(progress.track(range(3), "x")) == [0, 1, 2]
    assert progress.trainer_callback() is None
    assert capsys.readouterr().err == "" and not list(tmp_path.iterdir())


def test_meter_writes_rate_eta_and_the_calls_fraction(monkeypatch, tmp_path, capsys):
    path = tmp_path / "p.json"
    monkeypatch.setenv(progress.ENV, str(path))
    fake = Clock(100.0)
    monkeypatch.setattr(progress.time, "time", fake)
    monkeypatch.setattr(progress, "_phase", {"index": None, "count": None, "label": None, "started": None})
    monkeypatch.setattr(progress, "_last_log", [float("-inf")])
    progress.phase(1, 4, "mask 2")          # the second of 4 equal parts, started at t = 100 ...
    progress._phase["started"] = 60.0       # ... the first part began 40 s earlier
    meter = progress.Meter("eval", 10, "batch")
    fake.now = 110.0
    meter.set(5)                            # 5 batches in 10 s
    state = json.loads(path.read_text())
    assert state["rate"] == pytest.approx(0.5) and state["eta_s"] == pytest.approx(10.0)
    assert state["fraction"] == pytest.approx((1 + 0.5) / 4)
    assert state["eta_total_s"] == pytest.approx(50.0 * (1 - 0.375) / 0.375)   # 50 s for 37.5 % of the call
    assert "progress: eval 5/10 batches (50%), 0.5 batches/s, ETA 10s; part 2/4 (mask 2)" in capsys.readouterr().err


def test_chain_eta_uses_expected_times_then_this_machines_speed(clock):
    chain = ChainProgress([Stage("a", 100.0), Stage("b", 50.0), Stage("c", 200.0)])
    chain.planned("a", 4, 4)
    chain.planned("b", 2, 2)
    chain.planned("c", 1, 4)                # 3 of its 4 settings are done already: a quarter of its time left
    assert "overall ETA 3m20s" in chain.begin(0)          # 100 + 50 + 200 / 4 before anything ran
    clock.now += 50
    assert chain.eta(1, 4, [0.0]) == pytest.approx(150.0 + 50.0 + 50.0)   # a quarter done in 50 s: 150 s left, + b + c/4
    clock.now += 150                         # stage a took 200 s instead of 100: this machine is 2x slower
    chain.end(0)
    chain.begin(1)
    assert chain.speed() == pytest.approx(2.0)
    assert chain.eta() == pytest.approx(100.0 + 100.0)       # b: 50 × 2, c: 50 × 2
    clock.now += 30
    assert chain.eta(0, 2, [0.5]) == pytest.approx(90.0 + 100.0)   # b a quarter done in 30 s: 90 s left
    assert "stage 2/3 b" in chain.line(0, 2, [0.5]) and "overall ETA 3m10s" in chain.line(0, 2, [0.5])
