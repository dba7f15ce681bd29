"""Read the result JSONs the GLUE and LLM scripts write into one tidy table (one row per metric value).

Recognised files (each records its resolved config next to its metrics):

* ``train_plms_glue.py``: ``save_model_results/<task>/<lm>_lr<lr>[_run<r>]/<same>.json`` with ``script``,
  ``config``, ``seeds.run_seed``, ``validation_metrics`` / ``test_metrics`` per task → kind ``finetune``.
* ``inference_plms_glue.py``: ``save_model_results/<task>/<name>_inference_mask_.../<same>.json`` with
  ``config`` (weight_mask_rate, use_weight_rescale, mask_strategy, weight_format, seed) and ``metrics``
  per split → kind ``drop``.
* ``merge_plms_glue.py``: ``save_merge_results/<tasks>/<method>[/<apply>]/<lm><suffix>.json`` with the
  winner of the search (``winners.mean``: its test metrics per task) → kind ``merge``; with
  ``merging_method_name = mask_merging`` the row is "<apply method> + DARE" at the winner's drop rate.
  The per-setting detail files (``<stem>_settings/``) are part of that record and are not read again.
* the LLM scripts: ``save_gen_*_results/[<tasks>/]<dataset>/<save_name>/summary.json`` with ``metrics``
  (accuracy or pass@1), ``seed`` and ``config.arguments`` (the command line) → kind ``drop`` for
  inference_llms_instruct_math_code.py, ``merge`` for merge_llms_instruct_math_code.py; with ``--metric nll``
  the same under ``save_nll_results/`` with main metric ``answer_nll_per_token`` (lower is better).
* ``evaluate_lm_eval.py`` (lm-evaluation-harness): ``save_lm_eval_results/<name>/summary.json`` with per task
  the metrics under lm-eval's keys (``exact_match,strict-match``, ``acc,none``, ``answer_nll,none``) and the
  task's ``main_metric`` → one row per key, task = the lm-eval task; kind ``merge`` (method from the folder's
  merge manifest) or ``drop`` at p = 0 (the model as it is).

Variant of a drop setting (the paper's names): p = 0 → ``fine-tuned``; fine-tuned weights dropped
(``weight_format = finetuned_weight``) → ``fine-tuned weights``; magnitude → ``magnitude``; random with
rescale → ``DARE``; random without → ``DropOnly`` (a rescaled magnitude / non-rescaled fine-tuned-weight
drop gets "+ rescale" / "(no rescale)"). ``is_main`` marks the number the paper reports: the GLUE task's
main metric (configs/glue.yaml; MRPC/QQP/STS-B: the mean of their two metrics), the LLM benchmark's
accuracy / pass@1. Any other JSON found under a result folder, or given by name, is skipped with a
warning naming it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

COLUMNS = ["source", "domain", "script", "kind", "model", "task", "tasks", "method", "dare", "variant", "drop_rate",
           "rescale", "mask_strategy", "weight_format", "seed", "setting", "split", "metric", "is_main", "value"]
TIMING_SPLIT = "timing"   # merge rows of wall times (metric merge_time_s / search_time_s), not scores
GLUE_ROOTS = ("save_model_results", "save_merge_results")
LLM_ROOTS = ("save_gen_instruct_responses_results", "save_gen_codes_results", "save_gen_math_results",
             "save_nll_results", "save_lm_eval_results")
LLM_MAIN = {"gsm8k": "accuracy", "MATH": "accuracy", "human_eval": "pass@1", "mbpp": "pass@1"}
LLM_COUNTS = {"num_examples", "num_correct", "num_invalid", "answer_tokens"}
LLM_NLL_MAIN = "answer_nll_per_token"   # --metric nll summaries (metric_kind "nll"; lower is better)
AVERAGE = "average"


def variant_name(rate: float, rescale: bool, strategy: str, weight_format: str) -> str:
    if rate == 0.0:
        return "fine-tuned"
    if weight_format == "finetuned_weight":
        return "fine-tuned weights" if rescale else "fine-tuned weights (no rescale)"
    if strategy == "magnitude":
        return "magnitude + rescale" if rescale else "magnitude"
    return "DARE" if rescale else "DropOnly"


def short_name(name: Any) -> str:
    return Path(str(name).rstrip("/\\")).name


def _glue_main_metrics() -> dict[str, str]:
    from utils.glue.data import load_glue_config

    return {task: row["main_metric"] for task, row in load_glue_config()["tasks"].items()}


class Collector:
    """Turns result files into tidy rows; ``warnings`` names every file skipped."""

    def __init__(self):
        self.rows: list[dict] = []
        self.warnings: list[str] = []
        self.sources: list[str] = []
        self._glue_main: dict[str, str] | None = None

    def glue_main(self, task: str) -> str | None:
        if self._glue_main is None:
            self._glue_main = _glue_main_metrics()
        return self._glue_main.get(task)

    def add_paths(self, paths: Iterable[str | os.PathLike]) -> None:
        for path in paths:
            path = Path(path)
            if path.is_dir():
                for file in sorted(result_files(path)):
                    self.add_file(file)
            elif path.is_file():
                self.add_file(path)
            else:
                self.warnings.append(f"{path}: no such file or folder; skipped")

    def add_file(self, path: Path) -> None:
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            self.warnings.append(f"{path}: not readable JSON ({error}); skipped")
            return
        reader = self._reader(payload)
        if reader is None:
            self.warnings.append(f"{path}: not a result file of the GLUE or LLM scripts (different schema); skipped")
            return
        try:
            rows = reader(payload)
        except (KeyError, TypeError, ValueError) as error:
            self.warnings.append(f"{path}: result file with missing or malformed field {error}; skipped")
            return
        for row in rows:
            row["source"] = str(path)
            self.rows.append({column: row.get(column) for column in COLUMNS})
        self.sources.append(str(path))

    def _reader(self, payload: Any):
        if not isinstance(payload, dict):
            return None
        script = payload.get("script")
        if script == "train_plms_glue.py" and "test_metrics" in payload:
            return self._train
        if script == "inference_plms_glue.py" and "metrics" in payload:
            return self._glue_drop
        if script == "merge_plms_glue.py" and "winners" in payload:
            return self._glue_merge
        if script == "glue_multitask_benchmark.py" and payload.get("kind") == "constant_baseline":
            return self._constant_baseline
        if script == "evaluate_lm_eval.py" and isinstance(payload.get("tasks"), dict):
            return self._lm_eval
        if {"dataset", "metrics", "config"} <= set(payload) and isinstance(payload.get("config"), dict) \
                and "arguments" in payload["config"]:
            return self._llm
        return None

    def _metric_rows(self, base: dict, split: str, metrics: dict, main: str | None) -> list[dict]:
        rows = []
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            rows.append({**base, "split": split, "metric": name, "is_main": name == main, "value": float(value)})
        return rows

    def _train(self, payload: dict) -> list[dict]:
        config = payload["config"]
        tasks = list(config["tasks"])
        rows = []
        for split, key in (("test", "test_metrics"), ("validation", "validation_metrics")):
            for task, metrics in payload.get(key, {}).items():
                base = {"domain": "glue", "script": "train_plms_glue.py", "kind": "finetune",
                        "model": short_name(config["language_model_name"]), "task": task, "tasks": "+".join(tasks),
                        "method": "fine-tuned", "dare": False, "variant": "fine-tuned", "drop_rate": 0.0,
                        "seed": payload.get("seeds", {}).get("run_seed")}
                rows += self._metric_rows(base, split, metrics, self.glue_main(task))
        return rows

    def _glue_drop(self, payload: dict) -> list[dict]:
        config = payload["config"]
        rate = float(config["weight_mask_rate"])
        rescale, strategy, weight_format = bool(config["use_weight_rescale"]), config["mask_strategy"], config["weight_format"]
        task = config["task"]
        base = {"domain": "glue", "script": "inference_plms_glue.py", "kind": "drop",
                "model": short_name(config["language_model_name"]), "task": task, "tasks": task, "method": "drop",
                "dare": rate > 0, "variant": variant_name(rate, rescale, strategy, weight_format), "drop_rate": rate,
                "rescale": rescale, "mask_strategy": strategy, "weight_format": weight_format, "seed": int(config["seed"])}
        rows = []
        for split, metrics in payload["metrics"].items():
            rows += self._metric_rows(base, split, metrics, self.glue_main(task))
        return rows

    def _glue_merge(self, payload: dict) -> list[dict]:
        config = payload["config"]
        winner = payload["winners"]["mean"]
        dare = config["merging_method_name"] == "mask_merging"
        rate = float(winner.get("weight_mask_rate", 0.0)) if dare else 0.0
        tasks = list(config["tasks"])
        setting = winner.get("name")
        if dare and setting is not None and "weight_mask_rate" not in setting:
            setting += f"_weight_mask_rate_{rate}"
        base = {"domain": "glue", "script": "merge_plms_glue.py", "kind": "merge", "setting": setting,
                "model": short_name(config["language_model_name"]), "tasks": "+".join(tasks),
                "method": config["base_method"], "dare": dare,
                "variant": variant_name(rate, bool(config["use_weight_rescale"]), config["mask_strategy"], config["weight_format"]) if dare else "none",
                "drop_rate": rate, "rescale": bool(config["use_weight_rescale"]) if dare else None,
                "mask_strategy": config["mask_strategy"] if dare else None,
                "weight_format": config["weight_format"] if dare else None, "seed": int(config["seed"])}
        rows = []
        for task in tasks:
            rows += self._metric_rows({**base, "task": task}, "test", winner["test_metrics"][task], self.glue_main(task))
        rows.append({**base, "task": AVERAGE, "split": "test", "metric": "mean_main", "is_main": True,
                     "value": float(winner["test_scores"]["mean"])})
        timing = winner.get("timing")
        if timing:   # the winner's merge: DARE + statistics + the merge function (evaluation excluded)
            merge_time = sum(float(timing.get(key, 0.0)) for key in ("dare_time_s", "statistics_time_s", "merge_time_s"))
            rows.append({**base, "task": AVERAGE, "split": TIMING_SPLIT, "metric": "merge_time_s", "is_main": False, "value": merge_time})
        if "wall_time_s" in payload:
            rows.append({**base, "task": AVERAGE, "split": TIMING_SPLIT, "metric": "search_time_s", "is_main": False,
                         "value": float(payload["wall_time_s"])})
        return rows

    def _constant_baseline(self, payload: dict) -> list[dict]:
        """The best constant prediction's score per task (what an expert must clearly beat)."""
        rows = []
        for task, entry in payload["test_metrics"].items():
            base = {"domain": "glue", "script": "glue_multitask_benchmark.py", "kind": "baseline",
                    "model": "constant", "task": task, "tasks": task, "method": "constant", "dare": False,
                    "variant": "none", "drop_rate": 0.0, "setting": entry.get("prediction")}
            rows += self._metric_rows(base, "test", entry["metrics"], self.glue_main(task))
        return rows

    def _llm(self, payload: dict) -> list[dict]:
        arguments = payload["config"]["arguments"]
        dataset = payload["dataset"]
        merged = "merging_method_name" in arguments
        rate = float(arguments.get("weight_mask_rate", 0.0) or 0.0)
        rescale, strategy = bool(arguments.get("use_weight_rescale")), arguments.get("mask_strategy", "random")
        weight_format = arguments.get("weight_format", "delta_weight")
        if merged:
            method = arguments["merging_method_name"]
            dare = method == "mask_merging"
            if dare:
                method = arguments.get("mask_apply_method", method)
            else:
                rate = 0.0
            models = arguments.get("models") or payload["config"].get("models") or []
            base = {"script": "merge_llms_instruct_math_code.py", "kind": "merge", "method": method, "dare": dare,
                    "model": short_name(arguments.get("pretrained_model_name") or payload.get("tasks") or "merged"),
                    "tasks": payload.get("tasks") or "+".join(short_name(m) for m in models),
                    "variant": variant_name(rate, rescale, strategy, weight_format) if dare else "none"}
        else:
            base = {"script": "inference_llms_instruct_math_code.py", "kind": "drop", "method": "drop", "dare": rate > 0,
                    "model": short_name(arguments["finetuned_model_name"]), "tasks": dataset,
                    "variant": variant_name(rate, rescale, strategy, weight_format)}
        base.update({"domain": "llm", "task": dataset, "drop_rate": rate, "rescale": rescale, "mask_strategy": strategy,
                     "weight_format": weight_format, "seed": payload.get("seed", arguments.get("seed"))})
        metrics = {k: v for k, v in payload["metrics"].items() if k not in LLM_COUNTS}
        main = LLM_NLL_MAIN if payload.get("metric_kind") == "nll" else LLM_MAIN.get(dataset)
        return self._metric_rows(base, "test", metrics, main)

    def _lm_eval(self, payload: dict) -> list[dict]:
        merge = payload.get("merge")
        tasks = list(payload["tasks"])
        base = {"domain": "llm", "script": "evaluate_lm_eval.py", "model": short_name(payload["model"]),
                "tasks": "+".join(tasks), "drop_rate": 0.0, "seed": payload.get("seed")}
        if merge:
            base.update({"kind": "merge", "method": merge.get("method") or "merge", "dare": False, "variant": "none"})
        else:
            base.update({"kind": "drop", "method": "drop", "dare": False, "variant": "fine-tuned"})
        rows = []
        for task, entry in payload["tasks"].items():
            rows += self._metric_rows({**base, "task": task}, "test", entry["metrics"], entry.get("main_metric"))
        return rows


def result_files(folder: Path) -> Iterable[Path]:
    """The result JSONs under ``folder``: GLUE records under save_model_results/ and save_merge_results/
    (not the merge search's per-setting detail files), LLM summary.json under save_gen_*_results/."""
    for path in folder.rglob("*.json"):
        parts = path.absolute().parts
        roots = set(parts[:-1])
        if roots & set(GLUE_ROOTS):
            if any(part.endswith("_settings") for part in parts[:-1]):
                continue
            yield path
        elif roots & set(LLM_ROOTS) and path.name == "summary.json":
            yield path


def collect(paths: Iterable[str | os.PathLike]) -> Collector:
    collector = Collector()
    collector.add_paths(paths)
    return collector
