"""Task-vector analysis (statistics, layer grouping, pairwise cosine) and the norms of norm-adaptive merging."""
from .analyze import COMPUTE_DTYPES, DEFAULT_QUANTILES, AnalysisOptions, analyze, run_analysis
from .grouping import KINDS, NO_LAYER, LayerGrouping, kind_of
from .norms import norms_from_analysis, stream_task_vector_norms
from .statistics import AnalysisError, exact_quantiles, tensor_statistics

__all__ = ["AnalysisError", "AnalysisOptions", "COMPUTE_DTYPES", "DEFAULT_QUANTILES", "KINDS", "LayerGrouping",
           "NO_LAYER", "analyze", "exact_quantiles", "kind_of", "norms_from_analysis", "run_analysis",
           "stream_task_vector_norms", "tensor_statistics"]
