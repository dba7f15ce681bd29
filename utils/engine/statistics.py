"""Whole-tensor statistics for streaming a sparsifying GTA merge (ties, breadcrumbs*, dare_* with rescale)
a slerp or a ramplus_tl in flat pieces, so that a recipe's peak memory stays a few pieces whatever the tensor size.

Slerp needs the norms of both tensors and then their normalised dot product, each reduced over 2^20-element
chunks in mergekit's order: one pass per reduction, then the pieces are merged with the two coefficients.

ramplus_tl needs each model's counts of shared and unique entries: one pass adds them up (integers).

Each non-base input's sparsification of a tensor depends on the whole tensor in two ways only:
- a rank cut (TIES' top-k, Breadcrumbs' window): the order statistics of |δ| it needs are found by radix
  selection over the pieces (model_merging_methods/selection.py: one counting pass, a second one only when
  the value is not a bfloat16 number), and become a KeepRule; the ties it keeps are the first in flat
  order, so each piece needs how many entries equal to each cut-off value the earlier pieces hold: a
  TieLedger hands that out as the workers reach the pieces in order;
- an L1 rescale factor Σ|δ| / Σ|δ ⊙ m|: one more pass sums both over the pieces, in order.
Each pass re-reads the pieces and recomputes δ exactly as the merge does (same dtype, same ops), with a
few pieces in flight. The merge then runs piece by piece with a PieceSparsifier per input: the same bits
as merging the whole tensor (tests/test_recipes.py checks that).
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from model_merging_methods import recipe_methods
from model_merging_methods.mergekit_consensus import ramplus_tl_lambdas, ramplus_tl_piece_counts
from model_merging_methods.randomness import RandomSlot
from model_merging_methods.recipe_methods import (PieceSparsifier, RankCut, accumulator_dtype, rescale_factor,
                                                  slerp_chunk_dots, slerp_chunk_norms, slerp_coefficients, slerp_norm)
from model_merging_methods.registry import MergeMethod
from model_merging_methods.selection import KeepRule, RadixSelect, select_streamed

Span = tuple[int, int]
Load = Callable[[Span], dict[str, torch.Tensor]]   # a piece of every input, in the compute dtype


def map_in_order(pool: ThreadPoolExecutor, items: list, work: Callable, reduce: Callable, in_flight: int,
                 on_error: Callable[[], None] | None = None) -> None:
    """work(item) on the pool for every item, at most `in_flight` results waiting; reduce(result) in this
    thread, in item order. `on_error` runs in the worker whose work raised (before the error propagates),
    e.g. to release items that wait on it."""
    pending: deque[Future] = deque()

    def guarded(item):
        try:
            return work(item)
        except BaseException:
            if on_error is not None:
                on_error()
            raise

    for item in items:
        pending.append(pool.submit(guarded, item))
        while len(pending) > in_flight:
            reduce(pending.popleft().result())
    while pending:
        reduce(pending.popleft().result())



class TieLedger:
    """Per piece (in flat order), how many entries equal to each tie-window value lie in the earlier
    pieces. A worker passes its own piece's counts and waits for its predecessor's: pieces are handed to
    the pool's workers in order, so the predecessor is always running or done (no deadlock); a failed
    worker calls `abort` so that its successors stop waiting."""

    def __init__(self, pieces: int, windows: int):
        self._offsets: list[Optional[list[int]]] = [None] * (pieces + 1)
        self._offsets[0] = [0] * windows
        self._counts: list[Optional[list[int]]] = [None] * pieces
        self._aborted = False
        self._condition = threading.Condition()

    def claim(self, piece: int, counts: list[int]) -> list[int]:
        with self._condition:
            self._condition.wait_for(lambda: self._aborted or self._offsets[piece] is not None)
            if self._aborted:
                raise RuntimeError("an earlier piece of this tensor failed")
            if self._counts[piece] is None:
                self._counts[piece] = counts
                self._offsets[piece + 1] = [a + b for a, b in zip(self._offsets[piece], counts)]
                self._condition.notify_all()
            elif self._counts[piece] != counts:   # a later pass recomputed the piece differently: a bug
                raise RuntimeError(f"piece {piece}: tie counts {counts} differ from the first pass's {self._counts[piece]}")
            return self._offsets[piece]

    def abort(self) -> None:
        with self._condition:
            self._aborted = True
            self._condition.notify_all()


@dataclass
class PreparedInput:
    """One non-base input's whole-tensor statistics; `sparsifier(index, span)` for each piece."""

    cut: Optional[RankCut]
    density: float
    slot: Optional[RandomSlot]             # DARE draws of the whole tensor (random sparsification)
    rule: Optional[KeepRule] = None
    ledger: Optional[TieLedger] = None
    factor: Optional[torch.Tensor] = None
    # DARE keep masks the L1 pass drew, bit-packed per piece index (n/8 bytes): the merge pass reads them
    # instead of drawing every piece a second time
    masks: dict[int, np.ndarray] = field(default_factory=dict)

    def sparsifier(self, index: int, span: Span, numel: int) -> PieceSparsifier:
        offsets = (lambda counts: self.ledger.claim(index, counts)) if self.ledger is not None else None
        slot = None
        if self.slot is not None:
            slot = RandomSlot(self.slot.seed, self.slot.model_index, self.slot.name, span[0], numel)
        return PieceSparsifier(self.rule, offsets, slot, self.density, self.factor, self.masks.get(index))


@dataclass
class Prepared:
    """A tensor's statistics, and what each of its pieces' TensorGroupCall gets from them."""

    inputs: dict[str, PreparedInput]                             # GTA: per non-base input
    coefficients: Optional[tuple[torch.Tensor, torch.Tensor] | torch.Tensor] = None   # slerp; ramplus_tl's λ

    def call_fields(self, index: int, span: Span, numel: int) -> dict:
        if self.coefficients is not None:
            return {"piece_coefficients": self.coefficients}
        return {"piece_sparsifiers": {key: item.sparsifier(index, span, numel) for key, item in self.inputs.items()}}

    def abort(self) -> None:
        """A piece failed: the later pieces must not wait for its tie counts."""
        for item in self.inputs.values():
            if item.ledger is not None:
                item.ledger.abort()


def prepare(method: MergeMethod, base: str, per_input: dict[str, dict], params: dict, slots: dict[str, RandomSlot],
            load: Load, numel: int, dtype: torch.dtype, piece: int, pool: ThreadPoolExecutor,
            in_flight: int) -> Prepared:
    """One tensor's statistics, from passes over its pieces (see the module doc); `load` gives the pieces
    in the compute `dtype`."""
    spans = [(start, min(start + piece, numel)) for start in range(0, numel, piece)]
    if method.streaming == "slerp":
        return Prepared({}, _slerp_coefficients(base, next(k for k in per_input if k != base), params["t"], load,
                                                accumulator_dtype(dtype), spans, pool, in_flight))
    if method.streaming == "ramplus":
        return Prepared({}, _ramplus_lambdas(base, params, load, spans, pool, in_flight))
    return Prepared(_prepare_gta(method, base, per_input, params, slots, load, numel, spans, pool, in_flight))


def _slerp_coefficients(base: str, other: str, t: float, load: Load, accumulator: torch.dtype, spans: list[Span],
                        pool: ThreadPoolExecutor, in_flight: int) -> tuple[torch.Tensor, torch.Tensor]:
    """slerp_tensor's chunk norms (one pass), then chunk dots (a second pass), in flat order: pieces are
    whole 2^20-element chunks, so the values are the same as for the whole tensor."""
    chunk = recipe_methods.CHUNK
    if any(start % chunk for start, _ in spans):
        raise RuntimeError(f"slerp pieces must start at multiples of {chunk} elements")
    norms: tuple[list, list] = ([], [])

    def chunk_norms(span: Span):
        tensors = load(span)
        return slerp_chunk_norms(tensors[base], tensors[other])

    def add_norms(result) -> None:
        norms[0].extend(result[0])
        norms[1].extend(result[1])

    map_in_order(pool, spans, chunk_norms, add_norms, in_flight)
    norm_a, norm_b = slerp_norm(norms[0], accumulator), slerp_norm(norms[1], accumulator)
    dots: list[float] = []

    def chunk_dots(span: Span):
        tensors = load(span)
        return slerp_chunk_dots(tensors[base], tensors[other], norm_a, norm_b)

    map_in_order(pool, spans, chunk_dots, dots.extend, in_flight)
    return slerp_coefficients(dots, t, accumulator)


def _ramplus_lambdas(base: str, params: dict, load: Load, spans: list[Span], pool: ThreadPoolExecutor,
                     in_flight: int) -> torch.Tensor:
    """ramplus_tl's per-model λ from the whole tensor's shared / unique counts, summed over one pass."""
    totals: list[torch.Tensor] = []

    def counts(span: Span) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = load(span)
        return ramplus_tl_piece_counts(tensors[base], [t for k, t in tensors.items() if k != base], params["epsilon"])

    def add(result: tuple[torch.Tensor, torch.Tensor]) -> None:
        if totals:
            totals[0] += result[0]
            totals[1] += result[1]
        else:
            totals.extend(result)

    map_in_order(pool, spans, counts, add, in_flight)
    return ramplus_tl_lambdas(totals[0], totals[1], params["r"], params["alpha"], params["epsilon"])


def _prepare_gta(method: MergeMethod, base: str, per_input: dict[str, dict], params: dict,
                 slots: dict[str, RandomSlot], load: Load, numel: int, spans: list[Span], pool: ThreadPoolExecutor,
                 in_flight: int) -> dict[str, PreparedInput]:
    """Every non-base input's statistics of one tensor."""
    prepared: dict[str, PreparedInput] = {}
    for key, values in per_input.items():
        if key == base:
            continue
        density = values.get("density", 1.0)
        cut = None
        if method.sparsification == "magnitude":
            cut = RankCut("magnitude", density)
        elif method.sparsification == "outliers":
            cut = RankCut("outliers", density, values["gamma"])
        active = density < 1
        prepared[key] = PreparedInput(cut if active else None, density,
                                      slots.get(key) if active and method.sparsification == "random" else None)

    def deltas(span: Span, keys) -> dict[str, torch.Tensor]:   # exactly as gta_tensor computes them
        tensors = load(span)
        return {key: tensors[key] - tensors[base] for key in keys}

    # 1. order statistics of |δ| for the rank cuts: a high pass, then a low pass where needed
    selections = {key: [RadixSelect(k, numel) for k in item.cut.ranks(numel)]
                  for key, item in prepared.items() if item.cut is not None}
    select_streamed(selections, lambda work, reduce: map_in_order(pool, spans, work, reduce, in_flight), deltas)
    for key, item in prepared.items():
        if item.cut is not None:
            item.rule = item.cut.rule(numel, [s.statistic for s in selections[key]])
            if item.rule.windows:
                item.ledger = TieLedger(len(spans), len(item.rule.windows))

    # 2. the L1 rescale factors: Σ|δ| and Σ|δ ⊙ m| over the pieces, in float64, in flat order
    rescaled = {key: item for key, item in prepared.items()
                if params.get("rescale") and (item.cut is not None or item.slot is not None)}
    if rescaled:
        sums: dict[str, list] = {key: [0.0, 0.0, None] for key in rescaled}

        def l1(piece: tuple[int, Span]) -> dict[str, tuple[float, float, torch.dtype]]:
            index, span = piece
            out = {}
            for key, delta in deltas(span, set(rescaled)).items():
                sparsifier, before, after = rescaled[key].sparsifier(index, span, numel).l1_sums(delta)
                if sparsifier.packed_mask is not None:
                    rescaled[key].masks[index] = sparsifier.packed_mask
                out[key] = (before, after, sparsifier.work_dtype(delta))
            return out

        def add_l1(values: dict[str, tuple[float, float, torch.dtype]]) -> None:
            for key, (before, after, work) in values.items():
                sums[key] = [sums[key][0] + before, sums[key][1] + after, work]

        ledgers = [item.ledger for item in rescaled.values() if item.ledger is not None]
        map_in_order(pool, list(enumerate(spans)), l1, add_l1, in_flight,
                     on_error=lambda: [ledger.abort() for ledger in ledgers])
        for key, item in rescaled.items():
            item.factor = rescale_factor(*sums[key])
    return prepared
