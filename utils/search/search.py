"""Black-box search over a recipe template's free parameters: CMA-ES (PyPI ``cma``) or a grid.

Each trial: values from the sampler → the concrete recipe → ``merge_into`` the resident model (nothing read
from disk after the first trial) → the evaluator on the selection split (validation) → fitness = Σ weight ·
metric. Trials are appended to ``history.jsonl`` (one JSON line per trial, flushed and fsynced; its first line
is a header with the template's fingerprint, the fitness and the sampler), so a killed search resumes where it
stopped (``resume``); a history from another template, fitness or sampler is refused.

CMA-ES works in [0, 1]^d (each free parameter scaled to its range; ``cma`` bounds), starting from each
parameter's ``init`` (else the middle) with step ``sigma0``; a generation of ``popsize`` candidates is asked,
evaluated (in parallel with ``workers`` > 1) and told with −fitness (cma minimises). On resume the recorded
generations are replayed into the same seeded strategy (ask, then tell the recorded points), so the search goes
on as if never stopped. The grid sampler evaluates ``grid_points`` values per dimension (every combination),
the baseline that a search must beat at the same number of trials.

After the budget, the best trial (highest fitness; the first of equals) is merged again and evaluated on the
report split (held-out: GLUE dev); outputs: ``best_recipe.yml``, ``history.png`` (fitness per trial and
best-so-far), ``search_result.json`` (best values, its selection and report metrics, timing: trials per minute,
share of a trial spent merging vs evaluating, tensors read from disk after the first trial).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from model_merging_methods import MergeError
from model_merging_methods.options import DEFAULT_TIE_ORDER

from .evaluators import FitnessTerm, check_fitness, fitness_value
from .history import History, SearchError  # noqa: F401  (SearchError: the search's user error)
from .template import Template

SAMPLERS = ("cma", "grid")
LAUNCHERS = ("local", "ray")


@dataclass(frozen=True)
class SearchOptions:
    budget: int = 20                     # trials
    sampler: str = "cma"
    grid_points: int = 3
    popsize: Optional[int] = None        # CMA-ES candidates per generation (default cma's 4 + 3 ln d)
    sigma0: float = 0.25
    seed: int = 0                        # the sampler's seed, and the merge seed (DARE draws)
    workers: int = 1
    launcher: str = "local"
    select_split: str = "validation"
    report_split: str = "test"
    tie_order: str = DEFAULT_TIE_ORDER

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise SearchError(f"the budget must be at least 1 trial, got {self.budget}")
        if self.sampler not in SAMPLERS:
            raise SearchError(f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        if self.launcher not in LAUNCHERS:
            raise SearchError(f"unknown launcher {self.launcher!r}; valid: {', '.join(LAUNCHERS)}")
        if self.grid_points < 2 and self.sampler == "grid":
            raise SearchError(f"grid_points must be at least 2, got {self.grid_points}")
        if self.workers < 1:
            raise SearchError(f"workers must be at least 1, got {self.workers}")
        if not 0 < self.sigma0 <= 1:
            raise SearchError(f"sigma0 must lie in (0, 1], got {self.sigma0}")
        if self.popsize is not None and self.popsize < 2:
            raise SearchError(f"popsize must be at least 2, got {self.popsize}")


# ------------------------------------------------------------------------------------------------ trials
@dataclass(frozen=True)
class EvaluatorSpec:
    """What a worker needs to build its own resident evaluator (picklable): ``kind`` glue | lm_eval."""

    kind: str
    experts: dict = field(default_factory=dict)         # glue: task → folder
    glue: Any = None                                     # GlueEvalOptions
    model: Optional[str] = None                          # lm_eval: the resident model's folder
    lm_eval: dict = field(default_factory=dict)          # lm_eval: split → LmEvalOptions
    dtype: str = "auto"

    def build(self, splits: tuple[str, ...]):
        if self.kind == "glue":
            from .evaluators import GlueEvaluator

            return GlueEvaluator({t: Path(f) for t, f in self.experts.items()}, self.glue, splits)
        from .evaluators import LmEvalEvaluator

        return LmEvalEvaluator(Path(self.model), self.lm_eval, self.dtype)


class TrialRunner:
    """A resident evaluator and the inputs' tensors, built once; ``run`` merges and evaluates one trial."""

    def __init__(self, template_path: str, variables: dict, spec: EvaluatorSpec, options: SearchOptions,
                 threads: Optional[int] = None):
        import torch

        from .resident import ResidentModels

        if threads:
            torch.set_num_threads(threads)
        self.template = Template.load(template_path, variables)
        self.options = options
        self.evaluator = spec.build((options.select_split, options.report_split))
        self.resident = ResidentModels(self.evaluator.exclude, self.evaluator.prefix,
                                       keep=set(self.evaluator.target.state_dict()))

    def run(self, values: dict, split: str) -> dict:
        from .resident import merge_into

        started = time.perf_counter()
        report = merge_into(self.evaluator.target, self.template.recipe(values), self.resident, seed=self.options.seed,
                            tie_order=self.options.tie_order)
        merged = time.perf_counter()
        metrics = self.evaluator.evaluate(split)
        return {"metrics": metrics, "merge_seconds": merged - started, "eval_seconds": time.perf_counter() - merged,
                "disk_reads": report.disk_reads, "tensors": report.tensors}


_WORKER: Optional[TrialRunner] = None


def _init_worker(template_path: str, variables: dict, spec: EvaluatorSpec, options: SearchOptions, threads: int) -> None:
    global _WORKER
    _WORKER = TrialRunner(template_path, variables, spec, options, threads)


def _run_in_worker(values: dict, split: str) -> dict:
    return _WORKER.run(values, split)


class Pool:
    """Runs trials: in this process (workers = 1), in local worker processes, or on Ray actors; each worker
    holds its own resident evaluator, built once."""

    def __init__(self, template_path: str, variables: dict, spec: EvaluatorSpec, options: SearchOptions):
        self.options = options
        self.local: Optional[TrialRunner] = None
        self.executor = None
        self.actors = []
        threads = max(1, (os.cpu_count() or 1) // options.workers)
        if options.workers == 1:
            self.local = TrialRunner(template_path, variables, spec, options)
        elif options.launcher == "local":
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.executor = ProcessPoolExecutor(options.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker,
                                                initargs=(template_path, variables, spec, options, threads))
        else:
            import ray

            if not ray.is_initialized():
                ray.init(num_cpus=options.workers, include_dashboard=False, log_to_driver=False)
            actor = ray.remote(num_cpus=1)(TrialRunner)
            self.actors = [actor.remote(template_path, variables, spec, options, threads) for _ in range(options.workers)]

    def map(self, values: list[dict], split: str) -> list[dict]:
        if self.local is not None:
            return [self.local.run(v, split) for v in values]
        if self.executor is not None:
            return list(self.executor.map(_run_in_worker, values, [split] * len(values)))
        import ray

        refs = [self.actors[i % len(self.actors)].run.remote(v, split) for i, v in enumerate(values)]
        return ray.get(refs)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
        if self.actors:
            import ray

            ray.shutdown()


# ------------------------------------------------------------------------------------------------ samplers
def grid_points(template: Template, points: int) -> list[list[float]]:
    """Every combination of ``points`` evenly spaced values per dimension (choices: each choice once)."""
    axes = []
    for parameter in template.space.parameters:
        if parameter.choices is not None:
            axes.append([(i + 0.5) / len(parameter.choices) for i in range(len(parameter.choices))])
        else:
            axes.append([i / (points - 1) for i in range(points)])
    return [list(p) for p in itertools.product(*axes)]


def _trial_row(index: int, generation: int, point: list[float], values: dict, result: dict, fitness: float) -> dict:
    return {"kind": "trial", "trial": index, "generation": generation, "point": [float(x) for x in point],
            "values": values, "fitness": fitness, **result}


def run_search(template: Template, template_path: str, spec: EvaluatorSpec, fitness: tuple[FitnessTerm, ...],
               options: SearchOptions, output_dir: Path, resume: bool = False, variables: Optional[dict] = None,
               log: Callable[[str], None] = print) -> dict:
    """The whole search (see the module docstring); returns search_result.json's content."""
    header = {"kind": "header", "template": str(template_path), "template_sha256": template.fingerprint,
              "fitness": [asdict(t) for t in fitness], "sampler": options.sampler,
              "space": [p.describe() for p in template.space.parameters], "options": asdict(options)}
    check_fitness(spec, fitness)
    history = History(output_dir / "history.jsonl", header, resume)
    started = time.time()
    pool = Pool(template_path, dict(variables or {}), spec, options)
    try:
        if options.sampler == "grid":
            _grid(template, pool, fitness, options, history, log)
        else:
            _cma(template, pool, fitness, options, history, log)
        return _finish(template, pool, fitness, options, history, output_dir, time.time() - started, log)
    finally:
        pool.close()


def _evaluate_batch(template: Template, pool: Pool, fitness, options: SearchOptions, history: History,
                    points: list[list[float]], generation: int, log) -> list[float]:
    values = [template.space.values(p) for p in points]
    results = pool.map(values, options.select_split)
    scores = []
    for point, value, result in zip(points, values, results):
        score = fitness_value(fitness, result["metrics"])     # an unknown task / metric stops before recording
        index = len(history.trials)
        history.add(_trial_row(index, generation, point, value, result, score))
        best = max(t["fitness"] for t in history.trials)
        log(f"trial {index} (generation {generation}): fitness {score:.4f} (best {best:.4f}); "
            f"merge {result['merge_seconds']:.2f} s, evaluation {result['eval_seconds']:.2f} s; "
            + ", ".join(f"{k}={_short(v)}" for k, v in value.items()))
        scores.append(score)
    return scores


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _grid(template: Template, pool: Pool, fitness, options: SearchOptions, history: History, log) -> None:
    points = grid_points(template, options.grid_points)[:options.budget]
    done = len(history.trials)
    for start in range(done, len(points), max(1, options.workers)):
        _evaluate_batch(template, pool, fitness, options, history, points[start:start + options.workers], 0, log)


def _cma(template: Template, pool: Pool, fitness, options: SearchOptions, history: History, log) -> None:
    import cma

    space = template.space
    settings = {"bounds": [0.0, 1.0], "seed": options.seed + 1, "verbose": -9}
    if options.popsize:
        settings["popsize"] = options.popsize
    if space.dimensions == 1:
        raise SearchError("CMA-ES needs at least 2 free dimensions; use --sampler grid for one")
    strategy = cma.CMAEvolutionStrategy(space.start(), options.sigma0, settings)
    recorded = list(history.trials)
    generation = 0
    while len(history.trials) < options.budget:
        asked = [list(map(float, x)) for x in strategy.ask()]
        previous = [t for t in recorded if t["generation"] == generation]
        for trial, point in zip(previous, asked):    # replay: the seeded strategy asks the same points again
            if max(abs(a - b) for a, b in zip(trial["point"], point)) > 1e-9:
                raise SearchError(f"resumed history {history.path}: trial {trial['trial']} differs from what the "
                                  f"seeded CMA-ES asks (another seed or cma version?); use a new --output_dir")
        pending = asked[len(previous):][:options.budget - len(history.trials)]
        scores = [t["fitness"] for t in previous]
        if pending:
            scores += _evaluate_batch(template, pool, fitness, options, history, pending, generation, log)
        if len(scores) < len(asked):
            break                                     # the budget ends inside this generation
        strategy.tell(asked, [-s for s in scores])
        generation += 1


def best_trial(trials: list[dict]) -> dict:
    best = trials[0]
    for trial in trials[1:]:
        if trial["fitness"] > best["fitness"]:
            best = trial
    return best


def _finish(template: Template, pool: Pool, fitness, options: SearchOptions, history: History, output_dir: Path,
            seconds: float, log) -> dict:
    from utils.records import library_versions, write_json_atomic, write_text_atomic

    trials = history.trials[:options.budget]
    best = best_trial(trials)
    report = pool.map([best["values"]], options.report_split)[0]
    merge = sum(t["merge_seconds"] for t in trials)
    evaluation = sum(t["eval_seconds"] for t in trials)
    timing = {"trials": len(trials), "merge_seconds": merge, "eval_seconds": evaluation,
              "merge_share": merge / (merge + evaluation) if merge + evaluation else None,
              "trials_per_minute": 60.0 * len(trials) / (merge + evaluation) if merge + evaluation else None,
              "disk_reads_after_first": sum(t["disk_reads"] for t in trials[1:]) if options.workers == 1 else None,
              "wall_seconds_this_run": seconds}
    result = {"script": "search_merge.py", "template": history.header["template"],
              "template_sha256": template.fingerprint, "sampler": options.sampler, "options": asdict(options),
              "fitness": [asdict(t) for t in fitness], "space": history.header["space"],
              "best": {"trial": best["trial"], "values": best["values"], "fitness": best["fitness"],
                       "selection_split": options.select_split, "selection_metrics": best["metrics"],
                       "report_split": options.report_split, "report_metrics": report["metrics"],
                       "report_fitness": _report_fitness(fitness, report["metrics"])},
              "timing": timing, "versions": library_versions()}
    reported = result["best"]["report_fitness"]
    reported = f"{reported:.4f}" if reported is not None else "– (other tasks)"
    header = (f"# best of {len(trials)} trials ({options.sampler}) of {history.header['template']}: "
              f"{options.select_split} fitness {best['fitness']:.4f}, {options.report_split} fitness {reported}\n")
    write_text_atomic(output_dir / "best_recipe.yml", template.yaml(best["values"], header))
    _figure(trials, output_dir / "history.png", f"{Path(history.header['template']).name} ({options.sampler})")
    write_json_atomic(output_dir / "search_result.json", result)
    log(f"best trial {best['trial']}: {options.select_split} fitness {best['fitness']:.4f}, "
        f"{options.report_split} fitness {reported}; "
        f"{timing['trials_per_minute']:.2f} trials/min, merging {100 * timing['merge_share']:.1f}% of a trial")
    return result


def _report_fitness(fitness, metrics: dict) -> Optional[float]:
    """The fitness on the report split, when its tasks are the selection's (lm-eval may report other tasks)."""
    if any(term.task not in metrics or term.metric not in metrics[term.task] for term in fitness):
        return None
    return fitness_value(fitness, metrics)


def _figure(trials: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [t["trial"] for t in trials]
    ys = [t["fitness"] for t in trials]
    best = [max(ys[:i + 1]) for i in range(len(ys))]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(xs, ys, "o", markersize=3, label="trial fitness")
    axis.plot(xs, best, "-", label="best so far")
    axis.set_xlabel("trial")
    axis.set_ylabel("fitness (selection split)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)


# ------------------------------------------------------------------------------------------------ table
def comparison_table(results: list[dict], names: list[str]) -> str:
    """Markdown: one row per search (best setting), selection fitness and each task's report main metric."""
    tasks = []
    for result in results:
        for task in result["best"]["report_metrics"]:
            if task not in tasks:
                tasks.append(task)
    header = ["search", "sampler", "trials", f"{results[0]['best']['selection_split']} fitness",
              *[f"{t} ({results[0]['best']['report_split']})" for t in tasks], f"mean ({results[0]['best']['report_split']})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in zip(names, results):
        report = result["best"]["report_metrics"]
        mains = [report[t].get("main") if t in report else None for t in tasks]
        present = [m for m in mains if m is not None]
        cells = [name, result["sampler"], str(result["timing"]["trials"]), f"{result['best']['fitness']:.4f}",
                 *[f"{100 * m:.2f}" if m is not None else "–" for m in mains],
                 f"{100 * sum(present) / len(present):.2f}" if present else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
