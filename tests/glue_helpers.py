"""Helpers of the GLUE tests: slices of the real GLUE files and a tiny random BERT built on the fly."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

# The shared folder next to the checkout (main checkout) or next to the folder of the worktrees.
GLUE_DIR = next((root / "shared/data/glue" for root in Path(__file__).resolve().parents[2:4] if (root / "shared/data/glue").is_dir()),
                Path(__file__).resolve().parents[2] / "shared/data/glue")
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def require_glue_dir() -> Path:
    """The shared GLUE folder, or skip the test with the reason."""
    if not GLUE_DIR.is_dir():
        pytest.skip(f"real GLUE files not found at {GLUE_DIR}")
    return GLUE_DIR


def _head_lines(source: Path, target: Path, count: int | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if count is None:
        shutil.copyfile(source, target)
        return
    with open(source, encoding="utf-8", newline="") as reader, open(target, "w", encoding="utf-8", newline="") as writer:
        for index, line in enumerate(reader):
            if index >= count:
                break
            writer.write(line)


def glue_slice(root: Path, train_lines: int = 120, dev_lines: int = 60) -> Path:
    """A GLUE folder with the first lines of the real CoLA, SST-2, MRPC, STS-B and RTE files."""
    source = require_glue_dir()
    target = root / "glue"
    for relative in ["CoLA/train.tsv", "SST-2/train.tsv", "STS-B/train.tsv", "RTE/train.tsv", "MRPC/msr_paraphrase_train.txt"]:
        _head_lines(source / relative, target / relative, train_lines)
    for relative in ["CoLA/dev.tsv", "SST-2/dev.tsv", "STS-B/dev.tsv", "RTE/dev.tsv", "MRPC/dev.tsv"]:
        _head_lines(source / relative, target / relative, dev_lines)
    _head_lines(source / "MRPC/dev_ids.tsv", target / "MRPC/dev_ids.tsv", None)
    return target


def write_word_tokenizer(folder: Path, words) -> list[str]:
    """A lower-casing BERT word-piece tokenizer folder whose vocabulary is ``words``; returns the vocab."""
    vocab = SPECIAL_TOKENS + sorted(set(words))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}), encoding="utf-8")
    return vocab


def tiny_bert(root: Path, glue_dir: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A random 2-layer BERT encoder (hidden 32) with a word-level vocabulary of the slice's words."""
    from transformers import BertConfig, BertModel

    words = set()
    for path in glue_dir.rglob("*"):
        if path.is_file():
            words.update(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]", path.read_text(encoding="utf-8-sig").lower()))
    folder = root / "tiny-bert"
    vocab = write_word_tokenizer(folder, words)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=160)
    BertModel(config).save_pretrained(folder)
    return folder
