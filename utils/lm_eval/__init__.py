"""lm-evaluation-harness bridge: offline task declarations (configs/lm_eval/), on-disk and in-memory evaluation,
result files the aggregation reads. See bridge.py."""
from .bridge import (BACKENDS, TASKS_DIR, LmEvalError, LmEvalJob, LmEvalOptions, check_tasks, evaluate_folder, evaluate_module,
                     main_metric, offline_tasks, result_record, run_lm_eval, write_result)

__all__ = ["BACKENDS", "TASKS_DIR", "LmEvalError", "LmEvalJob", "LmEvalOptions", "check_tasks", "evaluate_folder", "evaluate_module",
           "main_metric", "offline_tasks", "result_record", "run_lm_eval", "write_result"]
