"""Merge search: recipe templates with free parameters (template.py), in-memory merges into resident models
(resident.py), evaluators and fitness (evaluators.py), CMA-ES / grid search with a resumable history
(search.py). Entry: search_merge.py.

Names are imported lazily, so that search_merge.py checks a template (template.py: no torch) before torch
loads."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "FitnessError": "evaluators", "FitnessTerm": "evaluators", "GlueEvalOptions": "evaluators", "GlueEvaluator": "evaluators",
    "LmEvalEvaluator": "evaluators", "fitness_value": "evaluators", "parse_fitness": "evaluators",
    "MergeReport": "resident", "ResidentModels": "resident", "merge_into": "resident",
    "EvaluatorSpec": "search", "SearchError": "search", "SearchOptions": "search", "comparison_table": "search",
    "run_search": "search",
    "FreeParameter": "template", "Space": "template", "Template": "template", "TemplateError": "template",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'utils.search' has no attribute '{name}'")
    return getattr(importlib.import_module(f"utils.search.{_EXPORTS[name]}"), name)
