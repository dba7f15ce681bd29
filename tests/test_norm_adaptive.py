"""norm_adaptive: weights from task-vector norms (the toolkit's published example, closed forms, zero norms),
the merge itself, and its command line (norms computed in a first pass, read from analysis.json, or typed)."""
import json
import math

import pytest
import torch

from model_merging_methods.norm_adaptive import norm_adaptive_weights
from model_merging_methods.options import MergeError

PUBLISHED_NORMS = [182.63, 31.87, 0.0, 0.529, 9.26]
PUBLISHED_WEIGHTS = [0.0052, 0.1485, 0.3021, 0.2986, 0.2457]


def test_published_example_in_exp_mode():
    weights = norm_adaptive_weights(PUBLISHED_NORMS, "exp", beta=1.0)
    assert weights == pytest.approx(PUBLISHED_WEIGHTS, abs=5e-5)
    # the formula: w_i = exp(−β L_i / mean L) / Σ_j exp(−β L_j / mean L), the mean over all five norms
    mean = sum(PUBLISHED_NORMS) / 5
    raw = [math.exp(-n / mean) for n in PUBLISHED_NORMS]
    assert weights == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)
    assert weights[2] == pytest.approx(1 / sum(raw))   # the zero-norm model keeps exp(0) = 1


def test_linear_and_power_closed_forms():
    assert norm_adaptive_weights([1.0, 2.0, 4.0], "linear") == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    raw = [1.0, 2.0 ** -1.5, 4.0 ** -1.5]
    assert norm_adaptive_weights([1.0, 2.0, 4.0], "power") == pytest.approx([r / sum(raw) for r in raw])
    assert norm_adaptive_weights([1.0, 2.0, 4.0], "power", alpha=2.0) == pytest.approx([16 / 21, 4 / 21, 1 / 21])
    assert norm_adaptive_weights([3.0, 3.0], "exp", beta=7.0) == pytest.approx([0.5, 0.5])
    # huge norms neither overflow nor underflow (softmax of log-weights)
    assert norm_adaptive_weights([1e-300, 1e300], "linear") == pytest.approx([1.0, 0.0])
    assert sum(norm_adaptive_weights([1e6, 1.0, 3.0], "exp", beta=50.0)) == pytest.approx(1.0)


def test_zero_norms():
    # linear / power: a zero-norm model gets weight 0 and the others are normalised among themselves
    assert norm_adaptive_weights([0.0, 1.0, 3.0], "linear") == pytest.approx([0.0, 0.75, 0.25])
    assert norm_adaptive_weights([0.0, 2.0], "power") == [0.0, 1.0]
    # exp: exp(0) = 1 → the zero model keeps a share (mean over both norms = 1)
    assert norm_adaptive_weights([0.0, 2.0], "exp") == pytest.approx([1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))])
    for mode in ("linear", "power", "exp"):
        with pytest.raises(MergeError, match="every task vector has L2 norm 0"):
            norm_adaptive_weights([0.0, 0.0], mode)
    with pytest.raises(MergeError, match="model 1 is nan"):
        norm_adaptive_weights([1.0, float("nan")], "exp")
    with pytest.raises(MergeError, match="model 0 is -1.0"):
        norm_adaptive_weights([-1.0, 2.0], "linear")
    with pytest.raises(MergeError, match="unknown norm mode 'cubic'"):
        norm_adaptive_weights([1.0], "cubic")
