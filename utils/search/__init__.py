"""Merge search: recipe templates with free parameters (template.py), in-memory merges into resident models
(resident.py), evaluators and fitness (evaluators.py), CMA-ES / grid search with a resumable history
(search.py). Entry: search_merge.py."""
from .evaluators import FitnessError, FitnessTerm, GlueEvalOptions, GlueEvaluator, LmEvalEvaluator, fitness_value, parse_fitness
from .resident import MergeReport, ResidentModels, merge_into
from .search import EvaluatorSpec, SearchError, SearchOptions, comparison_table, run_search
from .template import FreeParameter, Space, Template, TemplateError

__all__ = ["EvaluatorSpec", "FitnessError", "FitnessTerm", "FreeParameter", "GlueEvalOptions", "GlueEvaluator",
           "LmEvalEvaluator", "MergeReport", "ResidentModels", "SearchError", "SearchOptions", "Space", "Template",
           "TemplateError", "comparison_table", "fitness_value", "merge_into", "parse_fitness", "run_search"]
