"""Shared fixtures: the repository root on sys.path and tiny random checkpoints built on the fly."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True, scope="session")
def _hash_cache_in_a_temporary_folder(tmp_path_factory):
    """Merges remember their inputs' sha256 (utils/engine/reader.py); tests keep that out of the user's cache."""
    previous = os.environ.get("MERGELM_HASH_CACHE")
    os.environ["MERGELM_HASH_CACHE"] = str(tmp_path_factory.mktemp("hash_cache") / "file_sha256.json")
    yield
    if previous is None:
        os.environ.pop("MERGELM_HASH_CACHE", None)
    else:
        os.environ["MERGELM_HASH_CACHE"] = previous


def save_tiny_llama(folder: Path, seed: int, base: Path | None = None, scale: float = 0.01,
                    dtype: torch.dtype = torch.float32, vocab_size: int = 64) -> Path:
    """A 2-layer Llama; with `base`, the base's weights plus scale·N(0, 1) noise (a "fine-tune")."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if base is not None:
        reference = LlamaForCausalLM.from_pretrained(base)
        state = reference.state_dict()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                source = state[name]
                rows = min(source.shape[0], parameter.shape[0])
                parameter[:rows].copy_(source[:rows])
                parameter.add_(scale * torch.randn_like(parameter))
    model.to(dtype).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    """Base + two fine-tunes of a tiny random Llama, float32 safetensors folders."""
    root = tmp_path_factory.mktemp("llama")
    base = save_tiny_llama(root / "base", seed=0)
    return {"base": base, "ft0": save_tiny_llama(root / "ft0", 1, base), "ft1": save_tiny_llama(root / "ft1", 2, base)}


@pytest.fixture(scope="session")
def bert_family(tmp_path_factory) -> dict[str, Path]:
    """Base + two fine-tunes of a tiny random BERT encoder (AutoModel), float32 safetensors folders."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert")
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    return save_family(BertModel(config), root, ["base", "ft0", "ft1"])


def save_family(model, root: Path, names: list[str]) -> dict[str, Path]:
    """Save `model` as names[0] (the base), then each further name after adding 0.01·N(0, 1) to every
    parameter (fine-tunes drawn from torch's global generator: seed it first)."""
    folders = {}
    for index, name in enumerate(names):
        if index:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.01 * torch.randn_like(parameter))
        model.save_pretrained(root / name)
        folders[name] = root / name
    return folders
