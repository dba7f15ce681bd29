"""Build the LLM miniature's homologous family: θ_pre and one full-parameter SFT expert per skill.

    .venv/bin/python scripts/build_llm_family.py --root results/llm_family            # every expert declared
    .venv/bin/python scripts/build_llm_family.py --root R --experts math code          # a subset

Experts are declared in configs/llm_family.yaml (data, steps, batch, length, learning rate, seed). Each one is
trained into R/.EXPERT.partial-<pid>/ and renamed to R/EXPERT/ when complete, with R/EXPERT/family_expert.json
(the spec, data counts and sha256, losses, wall time, versions). Resumable: an expert whose folder exists is
skipped; a killed training resumes from the Trainer's last checkpoint in R/.work/EXPERT/ (every 50 steps).
R/family.json lists θ_pre and the experts built. ``--tiny`` trains a tiny random Llama base for tests.
Exit status: 0 done; 2 bad input (unknown expert, unreadable config or data); 130/143 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder of the family (created; experts go inside)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "llm_family.yaml"))
    parser.add_argument("--experts", nargs="+", default=None, help="names from the config (default: all)")
    parser.add_argument("--base", default=None, help="θ_pre folder (default: SmolLM2-135M-Instruct, converted once)")
    parser.add_argument("--data_dir", default=os.environ.get("MATH_CODE_DATA_DIR", str(ROOT.parent / "shared" / "data" / "math_code")))
    parser.add_argument("--max_steps", type=int, default=None, help="override every expert's max_steps")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def load_specs(path: Path, names: list[str] | None, max_steps: int | None):
    import yaml

    from utils.llm.family import ExpertSpec

    try:
        declared = yaml.safe_load(path.read_text(encoding="utf-8"))["experts"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise SystemExit(_fail(f"{path}: cannot read the experts table ({error})"))
    unknown = [name for name in names or [] if name not in declared]
    if unknown:
        raise SystemExit(_fail(f"--experts: unknown {unknown}; declared in {path}: {sorted(declared)}"))
    specs = []
    for name in names or list(declared):
        values = dict(declared[name])
        if max_steps is not None:
            values["max_steps"] = max_steps
        try:
            specs.append(ExpertSpec(name=name, **values))
        except TypeError as error:
            raise SystemExit(_fail(f"{path}: experts.{name}: {error}"))
    return specs


def _fail(message: str) -> int:
    print(f"build_llm_family.py: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root, data_dir = Path(args.root), Path(args.data_dir)
    specs = load_specs(Path(args.config), args.experts, args.max_steps)
    for name in {s.dataset: s for s in specs}:
        needed = {"gsm8k_train": "gsm8k_train.jsonl", "mbpp_train": "mbpp_full.jsonl"}.get(name)
        if needed and not (data_dir / needed).is_file():
            return _fail(f"--data_dir: {data_dir / needed} does not exist")
    from utils.llm.family import train_expert
    from utils.llm.smollm2 import ensure_smollm2
    from utils.records import library_versions, write_folder_atomic, write_json_atomic

    base = Path(args.base) if args.base else ensure_smollm2()
    root.mkdir(parents=True, exist_ok=True)
    built = {}
    for spec in specs:
        target = root / spec.name
        if (target / "family_expert.json").is_file():
            print(f"{spec.name}: exists, skipped ({target})")
            built[spec.name] = str(target)
            continue
        print(f"{spec.name}: training {spec.max_steps} steps × batch {spec.batch_size} on {spec.dataset}", flush=True)
        started = time.time()

        def write(staging: Path, spec=spec, started=started) -> None:
            record = train_expert(spec, base, staging, data_dir, work_dir=root / ".work" / spec.name,
                                  progress=not args.no_progress)
            record.update({"base": str(base), "wall_seconds": round(time.time() - started, 1),
                           "versions": library_versions(), "data_dir": str(data_dir)})
            (staging / "family_expert.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

        write_folder_atomic(target, write, overwrite=False, inputs={"the base model": base})
        built[spec.name] = str(target)
        print(f"{spec.name}: {target} ({time.time() - started:.0f} s)", flush=True)
    write_json_atomic(root / "family.json", {"base": str(base), "experts": built, "config": str(args.config)})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
