"""Offline fixtures for the LLM tests: a byte-level tokenizer, tiny random Llama families, data files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from utils.llm.generation import GenerationBackend, GenerationParams

BASE_VOCAB = 259  # <unk>, <s>, </s> + 256 byte symbols

GSM8K_RECORDS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A shop sells 1,200 pens a day. How many pens does it sell in 2 days?",
     "answer": "It sells 1,200 * 2 = <<1200*2=2400>>2,400 pens.\n#### 2,400"},
    {"question": "The temperature was 5 degrees and fell by 8 degrees. What is it now?",
     "answer": "5 - 8 = <<5-8=-3>>-3\n#### -3"},
]
MATH_RECORDS = [
    {"idx": "fixture_0", "instruction": "Compute $\\frac{1}{2}+\\frac{1}{4}$.",
     "output": "We get $\\frac{2}{4}+\\frac{1}{4}=\\boxed{\\frac{3}{4}}$."},
    {"idx": "fixture_1", "instruction": "What is $\\sqrt{16}$?", "output": "It is $\\boxed{4}$."},
]
MBPP_RECORDS = [
    {"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\r\n    return a + b",
     "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function to square a number.", "code": "def square(x):\r\n    return x * x",
     "test_list": ["assert square(3) == 9", "assert square(0) == 0", "assert square(-2) == 4"],
     "test_setup_code": "", "challenge_test_list": []},
]
ALPACA_RECORDS = [
    {"instruction": "Name a primary colour.", "output": "Red.", "generator": "text_davinci_003", "dataset": "vicuna"},
    {"instruction": "Say hello.", "output": "Hello!", "generator": "text_davinci_003", "dataset": "koala"},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_data_dir(folder: Path) -> Path:
    """GSM8K, MATH and MBPP fixture files under their original names, plus an AlpacaEval JSON."""
    write_jsonl(folder / "gsm8k_test.jsonl", GSM8K_RECORDS)
    write_jsonl(folder / "MATH_test.jsonl", MATH_RECORDS)
    write_jsonl(folder / "mbpp.test.jsonl", MBPP_RECORDS)
    (folder / "alpaca_eval.json").write_text(json.dumps(ALPACA_RECORDS), encoding="utf-8")
    return folder


def build_tokenizer(with_pad: bool):
    """Byte-level tokenizer without merges (every byte one token; any text round-trips), BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({symbol: index + 3 for index, symbol in enumerate(symbols)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if with_pad:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def save_tiny_llama(folder: Path, *, seed: int, base: Path | None = None, scale: float = 0.02,
                    with_pad: bool = False, rope_theta: float = 10000.0) -> Path:
    """A 2-layer random Llama with the byte tokenizer. With ``base``: base weights + scale·N(0,1)
    (a "fine-tune"); ``with_pad`` adds a [PAD] token and one embedding / lm_head row (vocab 260)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(with_pad)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rope_theta=rope_theta,
                         pad_token_id=tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        if base is None:
            for parameter in model.parameters():
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
        else:
            reference = LlamaForCausalLM.from_pretrained(base).state_dict()
            for name, parameter in model.named_parameters():
                source = reference[name]
                rows = min(source.shape[0], parameter.shape[0])
                parameter.zero_()
                parameter[:rows].copy_(source[:rows])
                if parameter.shape[0] > rows:
                    parameter[rows:].copy_(source.mean(dim=0, keepdim=True))
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(folder)
    return folder


def tiny_family(root: Path) -> dict[str, Path]:
    """Backbone (vocab 259) and two fine-tunes with an added [PAD] row (vocab 260), as in the paper."""
    base = save_tiny_llama(root / "base", seed=0)
    return {"base": base,
            "ft_math": save_tiny_llama(root / "ft_math", seed=1, base=base, with_pad=True),
            "ft_code": save_tiny_llama(root / "ft_code", seed=2, base=base, with_pad=True)}


class ScriptedBackend(GenerationBackend):
    """Returns ``reply(prompt)`` for each prompt and records the decoding parameters it was given."""

    name = "scripted"

    def __init__(self, reply: Callable[[str], str]):
        super().__init__()
        self.reply = reply
        self.params: list[GenerationParams] = []

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[str]:
        self.params.append(params)
        self.stats.generated_tokens += len(prompts)
        self.stats.seconds += 0.5
        return [self.reply(prompt) for prompt in prompts]

    def describe(self) -> dict:
        return {"backend": self.name}
