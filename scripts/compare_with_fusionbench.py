"""Compare the data-free frontier methods with FusionBench's implementations on small random models.

FusionBench pins its own dependencies: install it in a SEPARATE environment (never in this project's
requirements) and run this script with that environment's Python; only torch is needed from our side:

    python3 -m venv /work/venvs/fusionbench && /work/venvs/fusionbench/bin/pip install torch==2.13.0 fusion-bench
    /work/venvs/fusionbench/bin/python scripts/compare_with_fusionbench.py [--dtype float64] [--json out.json]

A random "model" is a dict of Llama-like tensors (attention and MLP matrices of several shapes, a norm
vector, a bias): a base θ_0 and T fine-tuned models θ_0 + τ_t, with τ_t of decaying spectrum (a sum of
rank-one terms) plus noise. Each method runs through our per-tensor functions and through FusionBench's
function on the same task vectors; the script prints, per method, the max |ours − FusionBench| over every
tensor and the max |FusionBench| for scale. Methods FusionBench lacks (PCB, CART, LiNeS) are not compared
here: tests/test_frontier_methods.py checks them against float64 references of the authors' code.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = {"layers.0.self_attn.q_proj.weight": (48, 48), "layers.0.mlp.up_proj.weight": (80, 48),
          "layers.0.mlp.down_proj.weight": (48, 80), "layers.1.self_attn.o_proj.weight": (48, 48),
          "layers.0.input_layernorm.weight": (48,), "layers.0.mlp.up_proj.bias": (80,)}


def random_task_vectors(num_models: int, seed: int, dtype: torch.dtype) -> list[OrderedDict]:
    """T task vectors with a decaying spectrum (Σ_i σ_i u_i v_iᵀ, σ_i = 0.9^i) plus small noise."""
    generator = torch.Generator().manual_seed(seed)
    vectors = []
    for _ in range(num_models):
        vector = OrderedDict()
        for name, shape in SHAPES.items():
            if len(shape) == 2:
                rank = min(shape)
                u = torch.randn(shape[0], rank, generator=generator, dtype=torch.float64)
                v = torch.randn(rank, shape[1], generator=generator, dtype=torch.float64)
                sigma = 0.9 ** torch.arange(rank, dtype=torch.float64)
                tensor = (u * sigma) @ v / rank + 1e-3 * torch.randn(shape, generator=generator, dtype=torch.float64)
            else:
                tensor = torch.randn(shape, generator=generator, dtype=torch.float64)
            vector[name] = (tensor * 1e-2).to(dtype)
        vectors.append(vector)
    return vectors


def max_diff(ours: dict, theirs: dict) -> tuple[float, float]:
    diff = max(float((ours[n].double() - theirs[n].double()).abs().max()) for n in theirs)
    scale = max(float(theirs[n].double().abs().max()) for n in theirs)
    return diff, scale


def per_tensor(function, vectors: list[dict], **kwargs) -> dict:
    return {name: function([v[name].clone() for v in vectors], **kwargs) for name in vectors[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=3, help="fine-tuned models T")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--wudi_iter_num", type=int, default=400, help="WUDI Adam steps (FusionBench config: 400)")
    parser.add_argument("--json", default=None, help="also write the table as JSON")
    args = parser.parse_args(argv)

    import fusion_bench
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import merging_with_regmean_weights
    from fusion_bench.method.tall_mask.task_arithmetic import generate_task_masks
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
    from fusion_bench.method.wudi.wudi import wudi_merging

    from model_merging_methods.consensus import consensus_tensor, tall_masks
    from model_merging_methods.fisher_regmean import regmean_merging
    from model_merging_methods.options import MergeOptions
    from model_merging_methods.subspace import iso_c_tensor, iso_cts_tensor, tsv_merge_tensor
    from model_merging_methods.wudi import wudi_tensor

    dtype = getattr(torch, args.dtype)
    vectors = random_task_vectors(args.models, args.seed, dtype)
    copies = lambda: [OrderedDict((n, t.clone()) for n, t in v.items()) for v in vectors]  # noqa: E731
    rows = {}

    theirs = compute_and_sum_svd_mem_reduction(copies(), accelerator="cpu")
    rows["tsv_merging"] = max_diff(per_tensor(tsv_merge_tensor, vectors, alpha=1.0), theirs)
    rows["iso_c"] = max_diff(per_tensor(iso_c_tensor, vectors, scaling_factor=1.0), iso_c(copies(), accelerator="cpu"))
    rows["iso_cts"] = max_diff(per_tensor(iso_cts_tensor, vectors, scaling_factor=1.0, common_space_fraction=0.8),
                               iso_cts(copies(), common_space_fraction=0.8, accelerator="cpu"))
    theirs = wudi_merging(copies(), accelerator="cpu", iter_num=args.wudi_iter_num)
    rows["wudi_merging"] = max_diff(per_tensor(wudi_tensor, vectors, iter_num=args.wudi_iter_num),
                                    {n: t.detach() for n, t in theirs.items()})

    # consensus (task arithmetic): FusionBench's TALL masks, then the authors' consensus count ≥ k
    generator = torch.Generator().manual_seed(args.seed + 1)
    base = OrderedDict((n, torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) * 0.02) for n, s in SHAPES.items())
    finetuned = [OrderedDict((n, base[n] + v[n]) for n in base) for v in vectors]
    deltas = [OrderedDict((n, f[n] - base[n]) for n in base) for f in finetuned]
    mtl = OrderedDict((n, sum(d[n] for d in deltas)) for n in base)
    lam, k = 0.6, 2
    # generate_task_masks documents weights: θ_mt = θ_0 + τ_MTL, θ_t, θ_0 (the authors' formula). FusionBench's own
    # TallMaskTaskArithmeticAlgorithm.run passes τ_MTL and τ_t instead, i.e. compares |θ_0 − τ_t|: not followed.
    multi = OrderedDict((n, base[n] + mtl[n]) for n in base)
    theirs_masks = [generate_task_masks(multi, f, base, tall_mask_lambda=lam) for f in finetuned]
    ours_masks = {n: tall_masks([d[n] for d in deltas], mtl[n], lam) for n in base}
    mask_diff = max(float((ours_masks[n][t].double() - theirs_masks[t][n].double()).abs().max())
                    for n in base for t in range(len(deltas)))
    theirs_consensus = OrderedDict((n, mtl[n] * (sum(m[n] for m in theirs_masks) >= k)) for n in base)
    ours_consensus = {n: consensus_tensor([d[n] for d in deltas], lam, k, 1.0) for n in base}
    rows["consensus_merging (TALL masks)"] = (mask_diff, 1.0)
    rows["consensus_merging"] = max_diff(ours_consensus, theirs_consensus)

    # RegMean's merge step as RegMean++ uses it (FusionBench merging_with_regmean_weights vs ours)
    models = [OrderedDict((n, base[n] + v[n]) for n in base) for v in vectors]
    grams = []
    for _ in models:
        stats = {}
        for name, shape in SHAPES.items():
            if len(shape) == 2 and name.endswith(".weight"):
                x = torch.randn(64, shape[1], generator=generator, dtype=torch.float64).to(dtype)
                stats[name[: -len(".weight")]] = x.T @ x / 64
        grams.append(stats)
    alpha = 0.95
    theirs = merging_with_regmean_weights({n: [m[n] for m in models] for n in base}, grams, reduce_non_diagonal_ratio=alpha)
    ours = regmean_merging(None, [dict(m) for m in models], MergeOptions(regmean_alpha=alpha),
                           [{f"{key}.weight": g for key, g in stats.items()} for stats in grams])
    rows["regmean_plusplus (merge step)"] = max_diff(ours, theirs)

    print(f"FusionBench {fusion_bench.__version__ if hasattr(fusion_bench, '__version__') else '?'}, torch {torch.__version__}, "
          f"T = {args.models}, {args.dtype}, seed {args.seed}")
    print(f"{'method':36s} {'max |ours − FusionBench|':>26s} {'max |FusionBench|':>18s}")
    for method, (diff, scale) in rows.items():
        print(f"{method:36s} {diff:26.3e} {scale:18.3e}")
    if args.json:
        Path(args.json).write_text(json.dumps({m: {"max_abs_diff": d, "max_abs_reference": s} for m, (d, s) in rows.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
