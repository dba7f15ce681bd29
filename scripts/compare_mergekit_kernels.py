"""Compare our mergekit-parity tensor functions with mergekit 0.1.5's own kernels on random tensors.

Run it with the Python of the separate mergekit environment (mergekit is never a project dependency):

    OMP_NUM_THREADS=1 /work/venvs/mergekit/bin/python scripts/compare_mergekit_kernels.py [--json out.json]

For every method (nuslerp, multislerp, karcher, sce, arcee_fusion, ram, ramplus_tl) and parameter setting,
dtypes bfloat16 and float32, and shapes from a vector to a 2^21-entry matrix, it builds a base and three
fine-tunes (base + small Gaussian deltas, some entries unchanged), calls mergekit's registered method
(with the tensors already in the compute dtype, as mergekit's recipes run) and ours
(model_merging_methods.registry), and prints max |Δ|, the number of differing entries and both
result dtypes. Both sides run on one torch thread: torch splits large reductions across threads, and
the rounding of norms and sums depends on the split. Exit status 1 when a deterministic case differs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergekit import merge_methods  # noqa: E402  (the separate environment's mergekit)
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

from model_merging_methods.recipe_methods import TensorGroupCall  # noqa: E402
from model_merging_methods.registry import get_method  # noqa: E402

SHAPES = [(64,), (33, 17), (256, 1024), (2048, 1024), (3000, 1111)]
# (method, global parameters, per-model weights?, with base?, number of fine-tunes)
CASES = [
    ("nuslerp", {}, True, True, 2),
    ("nuslerp", {}, True, False, 2),
    ("nuslerp", {"nuslerp_flatten": False}, True, True, 2),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, True, False, 2),
    ("multislerp", {}, True, True, 3),
    ("multislerp", {"normalize_weights": False}, True, False, 3),
    ("karcher", {}, False, False, 4),
    ("karcher", {"max_iter": 3, "tol": 1e-7}, False, False, 4),
    ("sce", {}, False, True, 3),
    ("sce", {"select_topk": 0.3}, False, True, 3),
    ("sce", {"select_topk": 0.5, "int8_mask": True}, False, True, 3),
    ("arcee_fusion", {}, False, True, 1),
    ("ram", {}, False, True, 3),
    ("ram", {"epsilon": 1e-3}, False, True, 3),
    ("ramplus_tl", {}, False, True, 3),
    ("ramplus_tl", {"r": 0.5, "alpha": 0.9, "epsilon": 1e-3}, False, True, 3),
]


def inputs(shape: tuple, count: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """base, then `count` fine-tunes: base + 1e-3·N(0,1), a quarter of the entries of each left unchanged."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator) * 0.02
    tensors = [base]
    for _ in range(count):
        delta = torch.randn(shape, generator=generator) * 1e-3
        delta *= torch.rand(shape, generator=generator) > 0.25
        tensors.append(base + delta)
    return [t.to(dtype) for t in tensors]


def run_case(name: str, params: dict, weighted: bool, with_base: bool, count: int, shape: tuple,
             dtype: torch.dtype, seed: int) -> dict:
    tensors = inputs(shape, count, dtype, seed)
    if not with_base:
        tensors = tensors[1:]
    weights = [0.6, 0.4, 0.8][:count]
    ids = [f"m{i}" for i in range(len(tensors))]
    base_id = ids[0] if with_base else None
    theirs_params = dict(params, **({"weight": weights} if weighted else {}))
    group = TensorGroup.from_tensors(tensors, ids=ids, base_index=0 if with_base else None, name="t")
    (theirs,) = merge_methods.get(name)((group,), parameters=theirs_params)

    method = get_method(name)
    resolved = {p.name: params.get(p.name, p.default) for p in method.parameters if p.scope == "global"}
    non_base = [i for i in ids if i != base_id]
    per_input = {i: ({"weight": weights[non_base.index(i)]} if weighted and i != base_id else {}) for i in ids}
    call = TensorGroupCall(dict(zip(ids, tensors)), base_id if method.base != "ignored" else None, resolved,
                           per_input)
    ours = method.implementation()(call)
    differing = int((ours.double() != theirs.double()).sum())
    return {"method": name, "parameters": params, "base": with_base, "shape": list(shape),
            "dtype": str(dtype).replace("torch.", ""), "max_abs_diff": float((ours.double() - theirs.double()).abs().max()),
            "differing": differing, "numel": ours.numel(), "dtypes": [str(ours.dtype), str(theirs.dtype)],
            "sampled": name == "arcee_fusion" and ours.numel() > 1_000_000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="also write every case here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=None, help="only these methods")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name, params, weighted, with_base, count in CASES:
        if args.methods and name not in args.methods:
            continue
        for dtype in (torch.bfloat16, torch.float32):
            for index, shape in enumerate(SHAPES):
                row = run_case(name, params, weighted, with_base, count, shape, dtype, args.seed + index)
                rows.append(row)
                print(f"{name:12s} {json.dumps(params):48s} base={int(with_base)} {row['dtype']:8s} "
                      f"{str(tuple(shape)):13s} max|Δ| {row['max_abs_diff']:.3e}  differing "
                      f"{row['differing']}/{row['numel']}  {'/'.join(row['dtypes'])}"
                      f"{'  (mergekit samples quartiles)' if row['sampled'] else ''}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    bad = [r for r in rows if (r["differing"] or r["dtypes"][0] != r["dtypes"][1]) and not r["sampled"]]
    print(f"{len(rows)} cases, {len(bad)} deterministic cases differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
