"""Defaults of the analysis that the command line needs, kept free of torch so that --help is fast."""
COMPUTE_DTYPE_NAMES = ("float32", "float64")
DEFAULT_QUANTILES = (0.5, 0.9, 0.99, 0.999)
