"""The output vocabulary of a recipe (`tokenizer_source` / `tokenizer:`) and the permutation of the
inputs' embedding and lm_head rows into it, with mergekit's rules.

Output tokenizer: `base` = the base model's (else the first model's); `union` = the base's plus every
token of the other inputs it lacks (input order; ids ≥ a model's vocab_size ignored), then their added
tokens; a model reference = that model's. Tokens named under `tokens:` are added when absent.
Rows of a token an input lacks (or every input's row when the token is `force`d) are filled from the
token's source: the `tokens:` entry (a model, a model's token, or zero); else the only input that has it;
else the base if it has it; else the mean of the inputs that have it; else zero (with a warning).
`pad_to_multiple_of` pads the rows with the mean of the real rows. The tokenizers are loaded
(metadata only) when planning; rows are permuted per tensor while merging.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .schema import ModelTokenSource, Recipe, RecipeError, TokenSpec, ZeroSource

# Our own renderings of the common chat formats (named as mergekit names them).
CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "alpaca": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] "
               "+ '\n\n' }}{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
               "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"),
    "mistral": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
                "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + "
                "eos_token }}{% else %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"),
}


@dataclass
class Vocabulary:
    tokenizer: object                                  # transformers tokenizer (the output's)
    vocab: dict[str, int]                              # output token → id
    rows: int                                          # output rows (vocab padded to pad_to_multiple_of)
    permutations: dict[str, torch.Tensor]              # input id → LongTensor[len(vocab)]: its row, or −1
    original_vocabs: dict[str, dict[str, int]]
    tokens: dict[str, TokenSpec] = field(default_factory=dict)
    base: Optional[str] = None
    source_folder: Optional[Path] = None               # the model whose tokenizer the output extends


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _vocab_size(config: dict, tokenizer) -> int:
    return int(config.get("vocab_size") or len(tokenizer.get_vocab()))


def build_vocabulary(recipe: Recipe, folders: dict[str, Path], configs: dict[str, dict]) -> Optional[Vocabulary]:
    """The output tokenizer and every input's permutation; None when the recipe copies the donor's files."""
    source, tokens, pad_to = recipe.tokenizer_choice()
    if source is None:
        return None
    refs = recipe.referenced_models()
    base = recipe.base_model or refs[0]
    if source not in ("union", "base") and source not in folders:
        raise RecipeError(f"tokenizer source {source!r} is not one of the recipe's models ({', '.join(refs)})")
    for token, spec in tokens.items():
        model = spec.source.model if isinstance(spec.source, ModelTokenSource) else spec.source
        if isinstance(model, str) and model not in folders:
            raise RecipeError(f"tokenizer.tokens[{token!r}].source: {model!r} is not one of the recipe's models")
    try:
        base_tokenizer = _load_tokenizer(folders[base])
    except Exception as error:
        raise RecipeError(f"cannot load the tokenizer of {base} ({type(error).__name__}: {error})") from None
    tokenizers = {base: base_tokenizer}
    for ref in refs:
        if ref != base:
            try:
                tokenizers[ref] = _load_tokenizer(folders[ref])
            except Exception:  # as mergekit: an input without a loadable tokenizer is assumed to share the base's
                tokenizers[ref] = base_tokenizer
    if source == "base":
        output = _copy(base_tokenizer)
    elif source == "union":
        output = _union(base, tokenizers, configs)
    else:
        output = _copy(tokenizers[source])
    # union and `tokens:` only add tokens (as added tokens): the source's core vocabulary stays as it is
    source_folder = folders[base] if source in ("base", "union") or tokenizers[source] is base_tokenizer \
        else folders[source]
    present = set(output.get_vocab())
    for token in tokens:
        if token not in present:
            output.add_tokens(token)
            present.add(token)
    vocab = output.get_vocab()
    rows = len(vocab)
    if pad_to and rows % pad_to:
        rows += pad_to - rows % pad_to
    permutations = {}
    for ref in refs:
        model_vocab = tokenizers[ref].get_vocab()
        limit = _vocab_size(configs[ref], tokenizers[ref])
        index = torch.full((len(vocab),), -1, dtype=torch.long)
        for token, new_id in vocab.items():
            old = model_vocab.get(token)
            if old is not None and old < limit:
                index[new_id] = old
        permutations[ref] = index
    return Vocabulary(output, vocab, rows, permutations, {r: t.get_vocab() for r, t in tokenizers.items()},
                      tokens, base, Path(source_folder))


def _copy(tokenizer):
    """An independent copy (save and reload) so that adding tokens never changes an input's tokenizer."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


def _union(base: str, tokenizers: dict, configs: dict[str, dict]):
    output = _copy(tokenizers[base])
    base_vocab = tokenizers[base].get_vocab()
    plain, added = {}, {}
    for ref, tokenizer in tokenizers.items():
        limit = _vocab_size(configs[ref], tokenizer)
        special = tokenizer.added_tokens_decoder
        special_contents = {info.content for info in special.values()}
        for token, index in tokenizer.get_vocab().items():
            if index < limit and token not in special_contents:
                plain.setdefault(token, None)
        for index, info in special.items():
            if index < limit:
                added.setdefault(info.content, info)
    for token in plain:
        if token not in added and token not in base_vocab:
            output.add_tokens(token)
    for info in added.values():
        output.add_tokens(info)
    return output


def permute_rows(vocabulary: Vocabulary, tensors: dict[str, torch.Tensor], base: Optional[str],
                 tensor_name: str) -> dict[str, torch.Tensor]:
    """Every input's rows (axis 0) in the output vocabulary's order, missing rows filled (module doc)."""
    models = list(tensors)
    dtype = tensors[models[0]].dtype
    for tensor in tensors.values():
        dtype = torch.promote_types(dtype, tensor.dtype)
    shape = tuple(tensors[models[0]].shape[1:])
    device = tensors[models[0]].device
    vocab = vocabulary.vocab
    index = torch.stack([vocabulary.permutations[m] for m in models])           # [models, vocab]
    for model, row in zip(models, index):
        row[row >= tensors[model].shape[0]] = -1   # ids beyond this checkpoint's rows count as absent
    present = index >= 0
    specs = dict(vocabulary.tokens)
    forced = {t for t, s in specs.items() if s.force}
    needs = [(token, token_id) for token, token_id in vocab.items()
             if token in forced or not bool(present[:, token_id].all())]
    defaults: dict[str, torch.Tensor] = {}
    for token, token_id in needs:
        spec = specs.get(token)
        have = [m for m, p in zip(models, present[:, token_id].tolist()) if p]
        if spec is None or spec.source is None:
            if len(have) == 1:
                spec = TokenSpec(source=have[0])
            elif not have:
                print(f"warning: token {token!r} is in no input model; its {tensor_name} row is zero")
                spec = TokenSpec(source=ZeroSource(kind="zero"))
            elif base in have:
                spec = TokenSpec(source=base)
            else:
                row = torch.zeros(shape, dtype=dtype, device=device)
                for model in have:
                    row = row + tensors[model][vocabulary.permutations[model][token_id]]
                defaults[token] = row / len(have)
                continue
        defaults[token] = _source_row(vocabulary, tensors, spec, token, token_id, shape, dtype)
    out = {}
    for model, row_index, has in zip(models, index, present):
        new = torch.zeros((vocabulary.rows, *shape), dtype=dtype, device=device)
        keep = has.clone()
        for token in forced:
            keep[vocab[token]] = False
        ids = keep.nonzero().squeeze(1)
        new[ids.to(device)] = tensors[model].to(dtype)[row_index[ids].to(device)]
        for token, row in defaults.items():
            token_id = vocab[token]
            if not bool(keep[token_id]):
                new[token_id] = row
        if vocabulary.rows > len(vocab):
            new[len(vocab):] = new[:len(vocab)].mean(dim=0)
        out[model] = new
    return out


def _source_row(vocabulary: Vocabulary, tensors: dict[str, torch.Tensor], spec: TokenSpec, token: str, token_id: int,
                shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    source = spec.source
    if isinstance(source, ZeroSource):
        return torch.zeros(shape, dtype=dtype, device=next(iter(tensors.values())).device)
    model = source.model if isinstance(source, ModelTokenSource) else source
    if model not in tensors:
        raise RecipeError(f"tokenizer.tokens[{token!r}]: source model {model!r} does not supply this tensor")
    if isinstance(source, ModelTokenSource):
        row = source.token_id
        if row is None:
            row = vocabulary.original_vocabs.get(model, {}).get(source.token)
            if row is None:
                raise RecipeError(f"tokenizer.tokens[{token!r}]: token {source.token!r} is not in {model}'s vocabulary")
        if not 0 <= row < tensors[model].shape[0]:
            raise RecipeError(f"tokenizer.tokens[{token!r}]: token id {row} is out of range for {model}")
        return tensors[model][row].to(dtype)
    row = int(vocabulary.permutations[model][token_id])
    if row < 0:
        raise RecipeError(f"tokenizer.tokens[{token!r}]: {model} does not have this token")
    return tensors[model][row].to(dtype)


def chat_template_text(recipe: Recipe, tokenizers: list) -> Optional[str]:
    """The template text `chat_template:` asks for (None: keep the tokenizer's own)."""
    choice = recipe.chat_template
    if choice is None:
        return None
    if choice == "auto":
        found = [t.chat_template for t in tokenizers if getattr(t, "chat_template", None)]
        return Counter(found).most_common(1)[0][0] if found else None
    return CHAT_TEMPLATES.get(choice, choice)
