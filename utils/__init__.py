"""Loading, streaming, data, metrics and evaluation around the merging library."""
