"""LoRA round trip on a real model: extract adapters from SmolLM2-135M fine-tunes at several ranks, measure
held-out NLL against rank, and merge two extracted adapters in adapter space vs merging the full deltas.

    flock /work/heavy.lock nice -n 10 .venv/bin/python scripts/lora_round_trip.py run --work_dir /work/artifacts/lora_rt
    .venv/bin/python scripts/lora_round_trip.py report --results docs/results/lora_round_trip.json

`run`: (1) two experts, each a brief full fine-tune of SmolLM2-135M-Instruct (utils/llm/smollm2.py) from the
same base — math on GSM8K train solutions, code on MBPP prompts + solutions (tasks 601+, outside MBPP's
test split) — or the LLM family's experts when --math_expert / --code_expert name them; (2) extract_lora at each rank,
fold it with PEFT (PeftModel.merge_and_unload: an implementation independent of ours) and score the mean
token NLL of held-out answers (GSM8K test, MBPP test); (3) the two rank-R adapters merged with merge_lora
(cat = exact sum, svd, ties, knots_ties) vs task arithmetic / TIES over the full deltas. Everything lands
in one JSON (config, seeds, versions, timings, metrics); `report` turns it into the README table and figure.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path("/work/shared/data/math_code")


def _examples(task: str, split: str, count: int) -> list[tuple[str, str]]:
    """(prompt, answer) pairs: GSM8K question → solution; MBPP text + first test → code."""
    if task == "math":
        path = DATA / ("gsm8k_train.jsonl" if split == "train" else "gsm8k_test.jsonl")
        rows = [json.loads(line) for line in path.open()]
        pairs = [(f"Question: {r['question']}\nAnswer:", " " + r["answer"]) for r in rows]
    else:
        rows = [json.loads(line) for line in (DATA / "mbpp_full.jsonl").open()]
        chosen = [r for r in rows if (r["task_id"] > 600 if split == "train" else 11 <= r["task_id"] <= 510)]
        pairs = [(f"{r['text']}\n{r['test_list'][0]}\n", r["code"]) for r in chosen]
    return pairs[:count]


MAX_LENGTH = [192]   # tokens per example (prompt + answer), set from --max_length


def _batches(tokenizer, pairs, max_length=None):
    max_length = max_length or MAX_LENGTH[0]
    import torch

    for prompt, answer in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        ids = (p + a)[:max_length]
        labels = ([-100] * len(p) + a)[:max_length]
        yield torch.tensor([ids]), torch.tensor([labels])


def nll(model, tokenizer, pairs) -> float:
    """Mean NLL per answer token (prompt tokens masked)."""
    import torch

    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ids, labels in _batches(tokenizer, pairs):
            out = model(input_ids=ids, labels=labels)
            count = int((labels[:, 1:] != -100).sum())
            total, tokens = total + float(out.loss) * count, tokens + count
    return total / tokens


def fine_tune(base: Path, task: str, out: Path, steps: int, lr: float, seed: int, batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "model.safetensors").is_file():
        return json.loads((out / "fine_tune.json").read_text())
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pairs = _examples(task, "train", steps * batch)
    batches = list(_batches(tokenizer, pairs))
    started, losses = time.time(), []
    for step in range(steps):
        optimizer.zero_grad()
        loss_sum = 0.0
        for ids, labels in batches[step * batch:(step + 1) * batch]:
            loss = model(input_ids=ids, labels=labels).loss / batch
            loss.backward()
            loss_sum += float(loss.detach())
        optimizer.step()
        losses.append(loss_sum)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"task": task, "steps": steps, "batch": batch, "max_length": MAX_LENGTH[0], "lr": lr, "seed": seed, "train_loss_first": losses[0],
              "train_loss_last": sum(losses[-3:]) / len(losses[-3:]), "seconds": round(time.time() - started, 1)}
    (out / "fine_tune.json").write_text(json.dumps(record, indent=2))
    return record


def folded_model(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).merge_and_unload()


def delta_merge(base: Path, experts: list[Path], method: str, density: float = 0.5):
    """Task arithmetic (λ = 1) or TIES (the paper's: top-density magnitudes, elected sign, disjoint mean)
    over the full deltas, in memory (the real-size path is merge_models.py; same formulas)."""
    import torch
    from transformers import AutoModelForCausalLM

    from model_merging_methods import MergeOptions, merge_state_dicts

    model = AutoModelForCausalLM.from_pretrained(base)
    states = [AutoModelForCausalLM.from_pretrained(e).state_dict() for e in experts]
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    options = MergeOptions(scaling_coefficient=1.0, density=[density] * len(experts)) if method == "ties_merging" \
        else MergeOptions(scaling_coefficient=1.0)
    merged = merge_state_dicts(method, base_state, states, options, seed=0)
    model.load_state_dict({k: merged.get(k, v) for k, v in base_state.items()})
    return model


def run(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.llm.smollm2 import ensure_smollm2
    from utils.lora.combine import CombineOptions
    from utils.lora.extract import ExtractJob, extract_lora
    from utils.lora.merge import LoraMergeJob, merge_adapters
    from utils.records import library_versions, project_provenance, write_json_atomic

    torch.set_num_threads(2)
    MAX_LENGTH[0] = args.max_length
    work = Path(args.work_dir)
    base = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(base)
    held_out = {task: _examples(task, "test", args.eval_examples) for task in ("math", "code")}
    experts, training = {}, {}
    for task in ("math", "code"):
        given = {"math": args.math_expert, "code": args.code_expert}[task]
        experts[task] = Path(given) if given else work / f"expert_{task}"
        if not given:
            training[task] = fine_tune(base, task, experts[task], args.steps, args.lr, args.seed, args.batch)
    score = lambda model, tasks=("math", "code"): {task: nll(model, tokenizer, held_out[task]) for task in tasks}
    results = {"base": str(base), "experts": {k: str(v) for k, v in experts.items()}, "training": training,
               "eval_examples": args.eval_examples, "max_length": args.max_length, "ranks": args.ranks, "seed": args.seed,
               "versions": library_versions(), "project": project_provenance(), "nll": {}, "extraction": {},
               "merges": {}}
    results["nll"]["base"] = score(AutoModelForCausalLM.from_pretrained(base))
    for task, folder in experts.items():
        results["nll"][f"{task}_expert"] = score(AutoModelForCausalLM.from_pretrained(folder))
        for rank in args.ranks:
            adapter = work / f"lora_{task}_r{rank}"
            report = extract_lora(ExtractJob(str(base), str(folder), str(adapter), rank=rank, embeddings="lora",
                                             non_lora="save", dtype="float32", overwrite=True))
            results["extraction"][f"{task}_r{rank}"] = {
                "rank": rank, "relative_error": report["total"]["relative_error"], "seconds": report["seconds"],
                "adapter_parameters": report["total"]["adapter_parameters"],
                "nll": score(folded_model(base, adapter), (task,))}
            print(task, rank, results["extraction"][f"{task}_r{rank}"], flush=True)
    rank = args.merge_rank
    for method in args.delta_methods:
        results["merges"][f"full_deltas_{method}"] = score(delta_merge(base, [experts["math"], experts["code"]], method))
    for combination in args.combinations:   # the norms extracted in full cannot be merged in
        adapters = []                                              # adapter space: LoRA-only extractions here
        for task in ("math", "code"):
            adapter = work / f"lora_{task}_r{rank}_nonorm"
            if not adapter.exists():
                extract_lora(ExtractJob(str(base), str(experts[task]), str(adapter), rank=rank, non_lora="skip",
                                        dtype="float32"))
            adapters.append(str(adapter))
        out = work / f"merged_{combination}"
        density = 0.5 if combination in ("ties", "knots_ties") else None
        merge_adapters(LoraMergeJob(adapters, str(out), [1.0, 1.0], CombineOptions(combination, density), overwrite=True))
        results["merges"][f"adapters_{combination}"] = score(folded_model(base, out))
        print(combination, results["merges"][f"adapters_{combination}"], flush=True)
    results["merge_rank"] = rank
    write_json_atomic(args.results, results)


def report(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(args.results).read_text())
    ranks = results["ranks"]
    lines = ["| expert | rank | adapter parameters | rel. error ‖ΔW−BA‖/‖ΔW‖ | NLL on its task (held out) |",
             "|---|---|---|---|---|"]
    for task in ("math", "code"):
        lines.append(f"| {task}: base model | – | – | – | {results['nll']['base'][task]:.4f} |")
        for rank in ranks:
            row = results["extraction"][f"{task}_r{rank}"]
            lines.append(f"| {task} | {rank} | {row['adapter_parameters']:,} | {row['relative_error']:.3f} | "
                         f"{row['nll'][task]:.4f} |")
        lines.append(f"| {task}: full fine-tune | – | – | 0 | {results['nll'][f'{task}_expert'][task]:.4f} |")
    lines += ["", f"| merge of math + code (weights 1, 1) | NLL math | NLL code |", "|---|---|---|"]
    for name, value in results["merges"].items():
        lines.append(f"| {name} | {value['math']:.4f} | {value['code']:.4f} |")
    print("\n".join(lines))
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for axis, task in zip(axes, ("math", "code")):
        values = [results["extraction"][f"{task}_r{rank}"]["nll"][task] for rank in ranks]
        axis.plot(ranks, values, "o-", label=f"{task} LoRA (extracted)")
        axis.axhline(results["nll"][f"{task}_expert"][task], color="green", ls="--", label=f"{task} expert (full)")
        axis.axhline(results["nll"]["base"][task], color="gray", ls=":", label="base")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("rank")
        axis.set_ylabel(f"NLL ({'GSM8K' if task == 'math' else 'MBPP'} test)")
        axis.legend(fontsize=7)
    figure.suptitle("SmolLM2-135M: extracted LoRA vs rank")
    figure.tight_layout()
    figure.savefig(args.figure, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--work_dir", required=True)
    run_parser.add_argument("--results", default=str(ROOT / "docs" / "results" / "lora_round_trip.json"))
    run_parser.add_argument("--math_expert", default=None, help="a math fine-tune of SmolLM2 to use instead of training")
    run_parser.add_argument("--code_expert", default=None, help="a code fine-tune of SmolLM2 to use instead of training")
    run_parser.add_argument("--steps", type=int, default=12)
    run_parser.add_argument("--lr", type=float, default=1e-4)
    run_parser.add_argument("--seed", type=int, default=0)
    run_parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    run_parser.add_argument("--merge_rank", type=int, default=64)
    run_parser.add_argument("--eval_examples", type=int, default=16)
    run_parser.add_argument("--batch", type=int, default=4)
    run_parser.add_argument("--max_length", type=int, default=192)
    run_parser.add_argument("--delta_methods", nargs="+", default=["task_arithmetic", "ties_merging"])
    run_parser.add_argument("--combinations", nargs="+", default=["cat", "svd", "ties", "knots_ties"])
    report_parser = sub.add_parser("report")
    report_parser.add_argument("--results", default=str(ROOT / "docs" / "results" / "lora_round_trip.json"))
    report_parser.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "lora_round_trip.png"))
    args = parser.parse_args(argv)
    (run if args.command == "run" else report)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
