"""Choices of the streaming engine's options, importable without torch (entry scripts parse with them
before the engine, and torch, are imported)."""

DTYPE_NAMES = ("float32", "bfloat16", "float16")
VOCAB_ALIGNMENTS = ("error", "pad_mean")
MERGE_PARTS = ("all", "language")   # --merge_part: every tensor, or a multimodal model's language model only
