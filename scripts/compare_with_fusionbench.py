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

RegMean++ is compared end to end on a tiny BERT classifier (2 blocks, 3 task models, all-ones attention
masks): FusionBench's `RegMeanAlgorithmPlusPlus` (its layer-by-layer loop, with the BERT hooks it leaves
to subclasses written here as its CLIP subclass does them) against this project's
`utils.glue.statistics.regmean_plusplus_merge`, which runs in this project's environment (`--ours_python`,
default .venv/bin/python) on the same saved models and token batches. Compared: the embeddings and every
block (FusionBench keeps the pretrained pooler; ours merges it, see the README).
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


BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def regmean_plusplus_inputs(folder: Path, num_models: int, seed: int) -> dict:
    """A tiny BERT base and task models (blocks, pooler perturbed) with their token batches, saved to folder."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    base = BertForSequenceClassification(BertConfig(**BERT)).eval()
    generator = torch.Generator().manual_seed(seed + 10)
    states = [{n: t + 0.3 * torch.randn(t.shape, generator=generator) for n, t in base.state_dict().items()}
              for _ in range(num_models)]
    batches = [[torch.randint(0, BERT["vocab_size"], (4, 7), generator=generator) for _ in range(2)] for _ in range(num_models)]
    payload = {"base": base.state_dict(), "states": states, "batches": batches, "alpha": 0.9}
    torch.save(payload, folder / "inputs.pt")
    return payload


def regmean_plusplus_fusionbench(payload: dict) -> dict:
    """FusionBench's RegMeanAlgorithmPlusPlus with BERT hooks (as its CLIP subclass implements them)."""
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import RegMeanAlgorithmPlusPlus
    from fusion_bench.modelpool import BaseModelPool
    from transformers import BertConfig, BertForSequenceClassification

    def model_of(state):
        model = BertForSequenceClassification(BertConfig(**BERT)).eval()
        model.load_state_dict(state)
        return model

    names = [f"task{k}" for k in range(len(payload["states"]))]

    class Pool(BaseModelPool):
        def __init__(self):   # the models live in `payload`; no Hydra config
            pass

        @property
        def model_names(self):
            return names

        def named_models(self):
            return [(n, model_of(s)) for n, s in zip(names, payload["states"])]

        def load_pretrained_model(self):
            return model_of(payload["base"])

        def load_train_dataset(self, name):
            return payload["batches"][names.index(name)]

    class ForBert(RegMeanAlgorithmPlusPlus):
        def merge_embedding_layer(self, models_to_merge_dict):
            keys = [n for n in payload["base"] if n.startswith("bert.embeddings")]
            return {n: torch.stack([m.state_dict()[n] for m in models_to_merge_dict.values()]).mean(dim=0) for n in keys}

        def get_input_for_first_layer(self, model, train_dataset):
            return [model.bert.embeddings(input_ids=ids).detach() for ids in train_dataset]

        def get_layers(self, model):
            return model.bert.encoder.layer

        def update_merged_params_dict(self, merged_params_dict, new_merged_params, layer_idx):
            for key, value in new_merged_params.items():
                merged_params_dict[f"bert.encoder.layer.{layer_idx}.{key}"] = value
            return merged_params_dict

        def layer_batches_forward(self, layer, batches_input):
            return [layer(batch).detach() for batch in batches_input]

        def get_regmean_weights(self, model_name, layer, batches_input, linear_modules_to_merge):
            grams, rows = {}, {}

            def hook_for(name):
                def hook(module, inputs, output):
                    x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
                    if name not in grams:
                        grams[name], rows[name] = x.T @ x / x.shape[0], x.shape[0]
                    else:
                        grams[name] = (grams[name] * rows[name] + x.T @ x) / (rows[name] + x.shape[0])
                        rows[name] += x.shape[0]
                return hook

            handles = [m.register_forward_hook(hook_for(n)) for n, m in linear_modules_to_merge.items()]
            self.layer_batches_forward(layer, batches_input)
            for handle in handles:
                handle.remove()
            return grams

    algorithm = ForBert(num_regmean_examples=8, exclude_param_names_regex=[], reduce_non_diagonal_ratio=payload["alpha"],
                        weight_transpose=True)
    with torch.no_grad():
        return algorithm.run(Pool()).state_dict()


def regmean_plusplus_ours(folder: Path) -> None:
    """This project's regmean_plusplus_merge on the saved inputs (runs in this project's environment)."""
    from transformers import BertConfig, BertForSequenceClassification

    from utils.glue.statistics import regmean_plusplus_merge

    payload = torch.load(folder / "inputs.pt", weights_only=True)
    models = []
    for state in payload["states"]:
        model = BertForSequenceClassification(BertConfig(**BERT)).eval()
        model.load_state_dict(state)
        models.append(model)
    loaders = [(lambda b=b: [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in b]) for b in payload["batches"]]
    merged = regmean_plusplus_merge(models, payload["states"], payload["base"], loaders, [8] * len(models), payload["alpha"],
                                    "cpu", exclude_regex=[".*classifier.*"])
    torch.save(merged, folder / "ours.pt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=3, help="fine-tuned models T")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--wudi_iter_num", type=int, default=400, help="WUDI Adam steps (FusionBench config: 400)")
    parser.add_argument("--json", default=None, help="also write the table as JSON")
    parser.add_argument("--ours_python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="this project's Python (runs our RegMean++; FusionBench's environment lacks our dependencies)")
    parser.add_argument("--regmean_plusplus_ours", default=None, help=argparse.SUPPRESS)   # internal: our side, in ours_python
    args = parser.parse_args(argv)
    if args.regmean_plusplus_ours:
        regmean_plusplus_ours(Path(args.regmean_plusplus_ours))
        return 0

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

    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        payload = regmean_plusplus_inputs(Path(folder), args.models, args.seed)
        theirs = regmean_plusplus_fusionbench(payload)
        subprocess.run([args.ours_python, str(Path(__file__).resolve()), "--regmean_plusplus_ours", folder], check=True, cwd=ROOT)
        ours = torch.load(Path(folder) / "ours.pt", weights_only=True)
    compared = [n for n in theirs if n.startswith(("bert.embeddings", "bert.encoder"))]
    rows["regmean_plusplus (tiny BERT, end to end)"] = max_diff({n: ours[n] for n in compared}, {n: theirs[n] for n in compared})

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
