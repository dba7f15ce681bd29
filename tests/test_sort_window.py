"""sort_window: the entries torch's CPU sort puts in a window, found by replaying only the partitions that
decide it — equal to torch.sort's own choice at tied cut-offs, whole-tensor windows of TIES and Breadcrumbs."""
import numpy as np
import pytest
import torch

from model_merging_methods import sort_window
from model_merging_methods.recipe_methods import RankCut
from model_merging_methods.sort_window import (NTH_ELEMENT_RUN, argsort_window_keep, replay_matches_torch, topk_keep,
                                              topk_replay_matches_torch, window_keep)


def _torch_window(x: torch.Tensor, lo: int, hi: int, descending: bool) -> np.ndarray:
    keep = np.zeros(x.numel(), dtype=bool)
    keep[torch.sort(x, descending=descending).indices[lo:hi].numpy()] = True
    return keep


def _tie_heavy(kind: int, n: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, generator=generator) * 1e-2
    return [x.bfloat16().float().abs(), torch.round(x * 300).abs() / 300, x.abs(), torch.zeros(n),
            torch.arange(n, dtype=torch.float32) % 7][kind]


@pytest.mark.skipif(not replay_matches_torch(), reason="this torch build does not sort with libstdc++'s introsort")
@pytest.mark.parametrize("kind", range(5))
def test_replay_equals_torch_sort_at_tied_cut_offs(kind):
    generator = torch.Generator().manual_seed(kind)
    for _ in range(60):
        n = int(torch.randint(1, 3000, (), generator=generator))
        x = _tie_heavy(kind, n, generator)
        lo = int(torch.randint(0, n, (), generator=generator))
        hi = int(torch.randint(lo, n + 1, (), generator=generator))
        for descending in (True, False):
            for window in ((0, hi), (lo, hi), (0, max(1, n // 2))):
                assert np.array_equal(window_keep(x.numpy(), *window, descending), _torch_window(x, *window, descending)), \
                    (kind, n, window, descending)


@pytest.mark.skipif(not replay_matches_torch(), reason="this torch build does not sort with libstdc++'s introsort")
def test_replay_on_a_large_bfloat16_task_vector():
    """2^20 + 3 bfloat16-rounded entries (thousands of copies of each value): TIES' top half and a Breadcrumbs
    window, the same entries as torch's sort; a plain stable order would differ at the cut-offs."""
    x = (torch.randn((1 << 20) + 3, generator=torch.Generator().manual_seed(7)) * 1e-3).bfloat16().float().abs()
    n = x.numel()
    top = window_keep(x.numpy(), 0, n // 2, True)
    assert np.array_equal(top, _torch_window(x, 0, n // 2, True))
    stable = np.zeros(n, dtype=bool)
    stable[torch.sort(x, descending=True, stable=True).indices[:n // 2].numpy()] = True
    assert not np.array_equal(top, stable)              # the case is one where the tie order matters
    window = (n // 10, n // 10 + n // 2)
    assert np.array_equal(window_keep(x.numpy(), *window, False), _torch_window(x, *window, False))


def test_argsort_window_keep_falls_back_to_torch(monkeypatch):
    """NaN values, a failed check and the heapsort depth all use torch's own sort: the same entries."""
    generator = torch.Generator().manual_seed(3)
    x = _tie_heavy(0, 5000, generator)
    with_nan = x.clone()
    with_nan[17] = float("nan")
    assert np.array_equal(argsort_window_keep(with_nan, 0, 2500, True).numpy(), _torch_window(with_nan, 0, 2500, True))

    def unusable(*args, **kwargs):
        raise AssertionError("the replay must not run")

    monkeypatch.setattr(sort_window, "replay_matches_torch", lambda: False)
    monkeypatch.setattr(sort_window, "window_keep", unusable)
    assert np.array_equal(argsort_window_keep(x, 0, 2500, True).numpy(), _torch_window(x, 0, 2500, True))
    monkeypatch.setattr(sort_window, "replay_matches_torch", lambda: True)
    monkeypatch.setattr(sort_window, "window_keep", lambda *args, **kwargs: None)      # the depth limit reached
    assert np.array_equal(argsort_window_keep(x, 100, 2600, False).numpy(), _torch_window(x, 100, 2600, False))


def test_argsort_cuts_keep_what_the_sort_keeps():
    """RankCut.argsort_keep (what mergekit-named TIES / Breadcrumbs use by default) = the scatter of torch's
    argsort window, for bfloat16 and float32 deltas."""
    generator = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float32):
        delta = (torch.randn(64, 517, generator=generator) * 1e-3).to(dtype)
        for cut in (RankCut("magnitude", 0.3), RankCut("outliers", 0.5, 0.1)):
            assert torch.equal(cut.argsort_keep(delta), cut.argsort_mask(delta, cut.argsort_order(delta)))


@pytest.mark.skipif(not topk_replay_matches_torch(), reason="this torch build's topk is not libstdc++'s nth_element")
@pytest.mark.parametrize("kind", range(5))
def test_nth_element_replay_equals_torch_topk(kind):
    """torch.topk (largest, k·64 > n: std::nth_element) keeps the entries the run-3 replay keeps, at tied k-th
    values; topk_keep equals torch.topk for every k (the heap path for small k is torch's own)."""
    generator = torch.Generator().manual_seed(10 + kind)
    for _ in range(60):
        n = int(torch.randint(1, 3000, (), generator=generator))
        x = _tie_heavy(kind, n, generator)
        for k in {1, int(torch.randint(1, n + 1, (), generator=generator)), max(1, n // 2), n}:
            expected = np.zeros(n, dtype=bool)
            expected[torch.topk(x, k).indices.numpy()] = True
            if k * 64 > n:
                assert np.array_equal(window_keep(x.numpy(), 0, k, True, run=NTH_ELEMENT_RUN), expected), (kind, n, k)
            assert np.array_equal(topk_keep(x.bfloat16() if kind == 0 else x, k).numpy(), expected), (kind, n, k)


def test_sce_selection_keeps_torch_topks_entries():
    """SCE's select mask (variance top-k across the models, bfloat16): the entries torch.topk keeps."""
    from model_merging_methods.mergekit_consensus import sce_select_mask

    generator = torch.Generator().manual_seed(4)
    stacked = (torch.randn(3, 300, 257, generator=generator) * 1e-3).bfloat16()
    for select_topk in (0.1, 0.5, 0.9):
        variance = torch.var(stacked, dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance) * select_topk)
        expected = torch.zeros(variance.numel(), dtype=torch.bfloat16)
        expected[torch.topk(variance.abs().view(-1), k).indices] = 1
        assert torch.equal(sce_select_mask(stacked, select_topk, torch.bfloat16), expected.view(variance.shape))

