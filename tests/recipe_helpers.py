"""Tiny random Llama checkpoints with word-level tokenizers, laid out as the example recipes expect
(`models/base`, its fine-tunes `models/chat` and `models/code`, and `models/chatml`: a fine-tune whose
tokenizer and embeddings add two ChatML tokens)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import save_tiny_llama

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 64)]
CHATML = ["<|im_start|>", "<|im_end|>"]


def save_tokenizer(folder: Path, extra_special: list[str] = ()) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    if extra_special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special)})
    tokenizer.save_pretrained(folder)


def build_models(root: Path) -> dict[str, Path]:
    """models/base, models/chat, models/code (vocab 64) and models/chatml (vocab 66: + ChatML tokens)."""
    models = root / "models"
    base = save_tiny_llama(models / "base", seed=0)
    save_tokenizer(base)
    folders = {"base": base}
    for seed, name in enumerate(["chat", "code"], start=1):
        folders[name] = save_tiny_llama(models / name, seed=seed, base=base)
        save_tokenizer(folders[name])
    folders["chatml"] = save_tiny_llama(models / "chatml", seed=3, base=base, vocab_size=66)
    save_tokenizer(folders["chatml"], CHATML)
    return folders


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder holding models/{base,chat,code,chatml}; each test links it into its own cwd (import this
    fixture and `cwd` into a test module to use them)."""
    root = tmp_path_factory.mktemp("recipes")
    build_models(root)
    return root


@pytest.fixture
def cwd(workspace, tmp_path, monkeypatch):
    (tmp_path / "models").symlink_to(workspace / "models")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path
