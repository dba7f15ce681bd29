"""Loading, streaming, data, metrics and evaluation around the merging library."""

__version__ = "0.1.0"  # the project's version, recorded in merge manifests
