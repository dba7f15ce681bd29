"""Benchmark merge_models.py against a pure-torch streaming floor and (optionally) mergekit.

Builds a Llama-architecture fixture (base + N variants with small deltas, sharded bf16 safetensors),
then times each merge as a whole process (wall seconds, peak RSS of the process) and prints a table.

    .venv/bin/python scripts/benchmark_merge.py --params 0.84 --variants 3 \
        --mergekit /path/to/other/venv/bin/mergekit-yaml
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, INTERMEDIATE, VOCAB = 2048, 5632, 32000


@dataclass(frozen=True)
class BenchMethod:
    """One benchmarked merge: merge_models.py's arguments and the same merge as a mergekit YAML (None: a
    paper method mergekit does not have)."""
    arguments: list[str]
    mergekit_method: str | None
    parameters: dict = field(default_factory=lambda: {"weight": 1.0})
    on_base: bool = True   # False: a plain mean of all models, the base model included as one of them
    single: bool = False   # base + the first variant only (slerp)


METHODS = {
    # mergekit's names (mergekit 0.1.5 semantics as flags too)
    "linear": BenchMethod(["--method", "linear"], "linear", on_base=False),
    "ties": BenchMethod(["--method", "ties", "--density", "0.5"], "ties", {"weight": 1.0, "density": 0.5}),
    # mergekit's ties with the streaming tie order (the default, argsort, holds whole tensors as mergekit does)
    "ties_index": BenchMethod(["--method", "ties", "--density", "0.5", "--tie_order", "index"], "ties",
                              {"weight": 1.0, "density": 0.5}),
    "dare_ties": BenchMethod(["--method", "dare_ties", "--density", "0.5"], "dare_ties",
                             {"weight": 1.0, "density": 0.5}),
    "dare_linear": BenchMethod(["--method", "dare_linear", "--density", "0.5"], "dare_linear",
                               {"weight": 1.0, "density": 0.5}),
    "slerp": BenchMethod(["--method", "slerp", "--slerp_t", "0.5"], "slerp", {}, single=True),
    # the paper's names (MergeLM semantics)
    "average_merging": BenchMethod(["--method", "average_merging"], None, on_base=False),
    "task_arithmetic": BenchMethod(["--method", "task_arithmetic"], "task_arithmetic"),
    "ties_merging": BenchMethod(["--method", "ties_merging", "--density", "0.5"], None),
    "ties_merging+dare": BenchMethod(["--method", "ties_merging", "--density", "0.5", "--drop_rate", "0.3"], None),
    # the data-free frontier (no mergekit counterpart); WUDI with 2 Adam steps (its cost grows linearly in iter_num)
    **{name: BenchMethod(["--method", name], "") for name in
       ("tsv_merging", "iso_c", "iso_cts", "cart", "consensus_merging", "lines", "pcb_merging")},
    "wudi_merging_2_steps": BenchMethod(["--method", "wudi_merging", "--parameter", "iter_num=2"], ""),
}


# recipe label → YAML for (models, layers of the fixture): run with merge_models.py --config and with mergekit
def _recipe_linear(models, layers):
    return "merge_method: linear\ndtype: bfloat16\nmodels:\n" + "".join(
        f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in models)


def _recipe_ties(models, layers):
    return f"merge_method: ties\nbase_model: {models[0]}\ndtype: bfloat16\nmodels:\n" + "".join(
        f"  - model: {m}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for m in models[1:])


def _recipe_dare_ties(models, layers):
    return _recipe_ties(models, layers).replace("merge_method: ties", "merge_method: dare_ties")


def _recipe_slerp(models, layers):
    return (f"merge_method: slerp\nbase_model: {models[0]}\ndtype: bfloat16\nslices:\n  - sources:\n"
            f"      - {{model: {models[0]}, layer_range: [0, {layers}]}}\n"
            f"      - {{model: {models[1]}, layer_range: [0, {layers}]}}\n"
            "parameters:\n  t:\n    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}\n"
            "    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}\n    - {value: 0.5}\n")


def _recipe_passthrough(models, layers):
    return (f"merge_method: passthrough\ndtype: bfloat16\nslices:\n"
            f"  - sources: [{{model: {models[0]}, layer_range: [0, {layers}]}}]\n"
            f"  - sources: [{{model: {models[1]}, layer_range: [0, {max(1, layers // 2)}]}}]\n")


def _recipe_slerp_plain(models, layers):
    """The same merge as `--method slerp --slerp_t 0.5` (base + the first variant)."""
    return (f"merge_method: slerp\nbase_model: {models[0]}\ndtype: bfloat16\nmodels:\n  - model: {models[0]}\n"
            f"  - model: {models[1]}\nparameters: {{t: 0.5}}\n")


def _recipe_on_base(method, count=None, parameters="", weights=False):
    """mergekit's `method` on the base and `count` variants (all of them by default)."""
    def recipe(models, layers):
        chosen = models[1:] if count is None else models[1:1 + count]
        weight = "\n    parameters: {weight: 1.0}" if weights else ""
        return (f"merge_method: {method}\nbase_model: {models[0]}\ndtype: bfloat16\n{parameters}models:\n"
                + "".join(f"  - model: {m}{weight}\n" for m in chosen))
    return recipe


RECIPES = {"linear": _recipe_linear, "ties": _recipe_ties, "dare_ties": _recipe_dare_ties, "slerp": _recipe_slerp_plain,
           "slerp-gradients": _recipe_slerp, "passthrough-1.5x": _recipe_passthrough,
           # mergekit 0.1.5's other methods (nuslerp takes two variants, arcee_fusion one; karcher counts the base)
           "nuslerp": _recipe_on_base("nuslerp", 2, weights=True),
           "multislerp": _recipe_on_base("multislerp", weights=True),
           "karcher": _recipe_on_base("karcher"),
           "sce": _recipe_on_base("sce", parameters="parameters: {select_topk: 0.5}\n"),
           "arcee_fusion": _recipe_on_base("arcee_fusion", 1),
           "ram": _recipe_on_base("ram"),
           "ramplus_tl": _recipe_on_base("ramplus_tl")}


def layer_count(params_billion: float) -> int:
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    embeddings = 2 * VOCAB * HIDDEN + HIDDEN
    return max(1, round((params_billion * 1e9 - embeddings) / per_layer))


def build_fixture(folder: Path, params_billion: float, variants: int, shard_bytes: int) -> list[Path]:
    """Base and variants (base + 1e-3·N(0,1) deltas) as sharded bf16 safetensors Llama folders."""
    import torch
    from safetensors.torch import save_file

    layers = layer_count(params_billion)
    names = [folder / "base"] + [folder / f"variant{i}" for i in range(variants)]
    if all((n / "model.safetensors.index.json").exists() for n in names):
        return names
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                       **{p + f"self_attn.{x}_proj.weight": (HIDDEN, HIDDEN) for x in "qkvo"},
                       p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE)})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": VOCAB, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16"}
    for index, target in enumerate(names):
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text(json.dumps(config, indent=2))
        shard, size, shard_files, weight_map = {}, 0, [], {}

        def flush():
            nonlocal shard, size
            name = f"model-{len(shard_files) + 1:05d}.safetensors"
            save_file(shard, target / name, metadata={"format": "pt"})
            shard_files.append(name)
            weight_map.update({t: name for t in shard})
            shard, size = {}, 0

        for tensor_index, (name, shape) in enumerate(shapes.items()):
            base = torch.randn(shape, generator=torch.Generator().manual_seed(tensor_index)) * 0.02
            if index:
                noise = torch.Generator().manual_seed(10_000 * index + tensor_index)
                base += torch.randn(shape, generator=noise) * 1e-3
            shard[name] = base.to(torch.bfloat16)
            size += shard[name].numel() * 2
            if size >= shard_bytes:
                flush()
        if shard:
            flush()
        index_json = {"metadata": {"total_size": sum(int(torch.tensor(s).prod()) * 2 for s in shapes.values())},
                      "weight_map": weight_map}
        (target / "model.safetensors.index.json").write_text(json.dumps(index_json))
    return names


def floor_merge(models: list[str], output: str) -> None:
    """The floor: read each tensor from every model, fp32 mean, bf16, write shard by shard (safetensors)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    handles = {}
    index = json.loads((Path(models[0]) / "model.safetensors.index.json").read_text())["weight_map"]
    Path(output).mkdir(parents=True)
    shard, size, count = {}, 0, 0
    for name, file in index.items():
        total = None
        for model in models:
            key = (model, file)
            if key not in handles:
                handles[key] = safe_open(str(Path(model) / file), framework="pt")
            tensor = handles[key].get_tensor(name).float()
            total = tensor if total is None else total.add_(tensor)
        shard[name] = total.div_(len(models)).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= 2**30:
            save_file(shard, f"{output}/model-{count:05d}.safetensors")
            shard, size, count = {}, 0, count + 1
    if shard:
        save_file(shard, f"{output}/model-{count:05d}.safetensors")


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 2**20


def mergekit_config(method: BenchMethod, models: list[Path], path: Path) -> None:
    lines = [f"merge_method: {method.mergekit_method}", f"base_model: {models[0]}", "dtype: bfloat16", "models:"]
    for model in models[1:]:
        lines.append(f"  - model: {model}")
        if method.parameters:
            lines.append("    parameters: {" + ", ".join(f"{k}: {v}" for k, v in method.parameters.items()) + "}")
    if method.single:
        lines.insert(4, f"  - model: {models[0]}")
        lines.append("parameters: {t: 0.5}")
    if not method.on_base:
        lines[1:2] = []
        lines.append(f"  - model: {models[0]}\n    parameters: {{weight: 1.0}}")
    path.write_text("\n".join(lines) + "\n")


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--params", type=float, default=0.84, help="billions of parameters per model")
    parser.add_argument("--variants", type=int, default=3, help="fine-tuned variants besides the base")
    parser.add_argument("--fixture_dir", default=None, help="where the fixture is built/reused (default: a temp dir)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds; each round runs every measurement once, in order (medians reported)")
    parser.add_argument("--mergekit", default=None, help="path to a mergekit-yaml executable (another venv)")
    parser.add_argument("--json_out", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--recipes", nargs="*", default=[], choices=list(RECIPES),
                        help="also time these recipes (merge_models.py --config, and mergekit on the same file)")
    parser.add_argument("--skip_floor", action="store_true", help="do not time the torch floor")
    parser.add_argument("--mergekit_only", action="store_true",
                        help="time only mergekit (with --mergekit), e.g. after a run of ours under the same load")
    parser.add_argument("--floor_only", nargs="+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--build_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor_only:
        floor_merge(args.floor_only[:-1], args.floor_only[-1])
        return 0
    fixture = Path(args.fixture_dir or tempfile.mkdtemp(prefix="merge-bench-"))
    if args.build_only:
        build_fixture(fixture, args.params, args.variants, shard_bytes=2**30)
        return 0
    print(f"building/reusing fixture in {fixture} ({layer_count(args.params)} layers) ...", flush=True)
    # built in a child: a parent grown by the fixture would pass its RSS to every forked measurement
    subprocess.run([sys.executable, __file__, "--build_only", "--params", str(args.params), "--variants",
                    str(args.variants), "--fixture_dir", str(fixture)], check=True)
    models = [fixture / "base"] + [fixture / f"variant{i}" for i in range(args.variants)]
    work = Path(tempfile.mkdtemp(prefix="merge-bench-out-"))
    jobs = []   # (label, tool, command maker, env): run in rounds, so a drift of the machine's speed hits all alike

    def measure(label, tool, make_command, env=None):
        jobs.append((label, tool, make_command, env))

    floor = lambda out: [sys.executable, __file__, "--floor_only", *map(str, models), str(out)]  # noqa: E731
    if not args.skip_floor:
        measure("linear", "torch floor", floor)
        measure("linear", "torch floor 1 thread", floor, {"OMP_NUM_THREADS": "1"})
    for label in args.methods:
        method = METHODS[label]
        variants = models[1:2] if method.single else models[1:]
        inputs = (["--base_model", str(models[0]), "--models", *map(str, variants)] if method.on_base
                  else ["--models", *map(str, models)])
        ours = [sys.executable, str(ROOT / "merge_models.py"), *inputs, *method.arguments, "--no_progress"]
        if not args.mergekit_only:
            measure(label, "merge_models", lambda out, ours=ours: ours + ["--output_dir", str(out)])
        if args.mergekit and method.mergekit_method:
            config = work / f"{label}.yml"
            mergekit_config(method, models[:2] if method.single else models, config)
            measure(label, "mergekit", lambda out, config=config: [
                args.mergekit, str(config), str(out), "--random-seed", "0", "--no-write-model-card",
                "--no-copy-tokenizer"])
    for label in args.recipes:
        recipe = work / f"recipe-{label}.yml"
        recipe.write_text(RECIPES[label](models, layer_count(args.params)))
        if not args.mergekit_only:
            measure(f"recipe {label}", "merge_models --config", lambda out, recipe=recipe: [
                sys.executable, str(ROOT / "merge_models.py"), "--config", str(recipe), "--output_dir", str(out),
                "--no_progress"])
        if args.mergekit:
            measure(f"recipe {label}", "mergekit", lambda out, recipe=recipe: [
                args.mergekit, str(recipe), str(out), "--random-seed", "0", "--no-write-model-card",
                "--no-copy-tokenizer"])
    runs: dict[int, list] = {index: [] for index in range(len(jobs))}
    for repeat in range(args.repeats):          # round r runs every measurement once, in the order given
        for index, (label, tool, make_command, env) in enumerate(jobs):
            out = work / f"{tool.replace(' ', '_')}-{label}-{repeat}"
            load = os.getloadavg()[0]
            wall, rss = timed(make_command(out), env)
            runs[index].append({"wall_s": round(wall, 2), "peak_rss_gib": round(rss, 2), "load_before": round(load, 2)})
            shutil.rmtree(out, ignore_errors=True)
            print(f"round {repeat + 1}: {label:16s} {tool:20s} {wall:8.2f} s {rss:6.2f} GiB (load {load:.2f})", flush=True)
    rows = [{"method": label, "tool": tool, "wall_s": round(statistics.median(r["wall_s"] for r in runs[index]), 2),
             "peak_rss_gib": round(statistics.median(r["peak_rss_gib"] for r in runs[index]), 2), "runs": runs[index]}
            for index, (label, tool, _, _) in enumerate(jobs)]
    linear = next((row["wall_s"] for row in rows if row["method"] == "linear" and row["tool"] == "merge_models"), None)
    print("\n| method | tool | wall (s) | peak RSS (GiB) | × linear |\n|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['wall_s'] / linear:.2f}" if linear else "–"
        print(f"| {row['method']} | {row['tool']} | {row['wall_s']} | {row['peak_rss_gib']} | {ratio} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"params_billion": args.params, "variants": args.variants,
                                                   "repeats": args.repeats, "interleaved": True,
                                                   "commit": _commit(), "rows": rows}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    if args.fixture_dir is None:
        shutil.rmtree(fixture, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
