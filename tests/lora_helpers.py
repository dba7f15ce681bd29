"""Tiny base checkpoints and PEFT-made LoRA adapters for the utils/lora tests."""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama(folder: Path, seed: int = 0, tied: bool = False, dtype: torch.dtype = torch.float32,
               hidden: int = 16) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    return folder


def tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def tiny_bert(folder: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    return folder


def load_base(folder: Path, dtype: torch.dtype | None = None):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    auto = AutoModel if config.model_type == "bert" else AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype=dtype) if dtype else auto.from_pretrained(folder)


def make_adapter(base: Path, folder: Path, seed: int = 1, scale: float = 1.0, **config) -> Path:
    """A PEFT LoRA adapter of `base` with random (non-zero) A and B, saved by PEFT itself (config key
    save_embedding_layers: passed to save_pretrained, not to LoraConfig)."""
    from peft import LoraConfig, get_peft_model

    save_embedding_layers = config.pop("save_embedding_layers", "auto")

    model = load_base(base)
    torch.manual_seed(seed)
    config.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(model, LoraConfig(**config))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.mul_(scale)
            elif parameter.requires_grad:   # modules_to_save / trained biases: make them differ from the base
                parameter.add_(0.1 * torch.randn_like(parameter))
    peft_model.save_pretrained(folder, save_embedding_layers=save_embedding_layers)
    return folder


def merged_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own answer: PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base), str(adapter)).merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
