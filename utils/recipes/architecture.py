"""Where a checkpoint keeps its decoder layers, found from its tensor names and its config.

No list of architectures: the layer prefix is the `<prefix>.<i>.` under which the tensor names count
0..N−1, where N is the config's layer count (num_hidden_layers, or n_layer / num_layers / n_layers for
families that name it so). Non-layer tensors are split into those before the layers (the input and
position embeddings: names with embed / wte / wpe / word_embeddings, output heads excluded) and those
after them (final norm, lm_head). When no name looks like an embedding, the split follows the order in
which the transformers model declares its parameters (built on the meta device: no memory, no weights;
importing the model code is slow, hence only then). The vocabulary tensors are the input embedding and
the output head (lm_head; for tied checkpoints that lack it, the input embedding stands in).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .schema import RecipeError

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
NUMBERED = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")
EMBEDDING_WORDS = ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings")
OUTPUT_WORDS = ("lm_head", "embed_out", "output.weight")   # output embeddings (before the embedding words)
VOCAB_WORDS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")


@dataclass
class Layout:
    """One checkpoint's tensor layout."""

    folder: Path
    config: dict
    names: list[str]
    layer_key: str
    num_layers: int
    prefix: str                                   # e.g. "model.layers" (layer i: f"{prefix}.{i}.{suffix}")
    layer_suffixes: dict[int, list[str]] = field(default_factory=dict)
    pre: list[str] = field(default_factory=list)
    post: list[str] = field(default_factory=list)
    vocab: set[str] = field(default_factory=set)
    input_embedding: str | None = None
    output_embedding: str | None = None

    def layer_name(self, index: int, suffix: str) -> str:
        return f"{self.prefix}.{index}.{suffix}"

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False)) or (
            self.output_embedding is not None and self.output_embedding not in self.names)


def read_config(folder: Path, what: str) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise RecipeError(f"{what}: {folder} has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RecipeError(f"{what}: {path} is not valid JSON ({error})") from None


def layer_count(config: dict, what: str) -> tuple[str, int]:
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return key, config[key]
    raise RecipeError(f"{what}: cannot map this architecture ({config.get('architectures')}): its config.json has "
                      f"none of {', '.join(LAYER_COUNT_KEYS)}")


def infer_layout(folder: Path, names: list[str], what: str) -> Layout:
    config = read_config(folder, what)
    key, count = layer_count(config, what)
    groups: dict[str, dict[int, list[str]]] = {}
    for name in names:
        match = NUMBERED.match(name)
        if match:
            groups.setdefault(match["prefix"], {}).setdefault(int(match["index"]), []).append(match["rest"])
    candidates = [p for p, layers in groups.items() if sorted(layers) == list(range(count))]
    if not candidates:
        found = {p: len(layers) for p, layers in groups.items()}
        raise RecipeError(f"{what}: cannot map this architecture ({config.get('architectures')}): no tensor prefix "
                          f"numbers {key} = {count} layers 0..{count - 1} (numbered prefixes found: {found})")
    prefix = max(candidates, key=lambda p: sum(len(v) for v in groups[p].values()))
    layout = Layout(Path(folder), config, list(names), key, count, prefix, groups[prefix])
    in_layers = {layout.layer_name(i, s) for i, suffixes in groups[prefix].items() for s in suffixes}
    others = [n for n in names if n not in in_layers]
    outputs = [n for n in others if any(w in n for w in OUTPUT_WORDS)]
    inputs = [n for n in others if n not in outputs and any(w in n for w in EMBEDDING_WORDS)]
    if inputs:   # the usual decoder layout, read from the names alone (no transformers import: it is slow)
        layout.pre = inputs
        layout.post = [n for n in others if n not in inputs]
        layout.input_embedding = next((n for n in inputs if any(w in n for w in VOCAB_WORDS)), inputs[0])
        layout.output_embedding = outputs[0] if outputs else _tied_output_name(config, layout.input_embedding)
    else:        # unusual names: the order in which the transformers model declares its parameters
        order, input_embedding, output_embedding = _declared_order(Path(folder), config)
        first_layer = min((order[n] for n in in_layers if n in order), default=None) if order else None
        if first_layer is None or any(n not in order for n in others):
            raise RecipeError(f"{what}: cannot map this architecture ({config.get('architectures')}): no embedding "
                              f"tensor among {others} and transformers cannot place them")
        layout.pre = sorted((n for n in others if order[n] < first_layer), key=order.get)
        layout.post = sorted((n for n in others if order[n] > first_layer), key=order.get)
        layout.input_embedding, layout.output_embedding = input_embedding, output_embedding
    layout.vocab = {n for n in (layout.input_embedding, layout.output_embedding) if n}
    if layout.output_embedding and layout.output_embedding not in names and layout.output_embedding in layout.post:
        layout.post.remove(layout.output_embedding)
    return layout


def _tied_output_name(config: dict, input_embedding: str) -> str | None:
    """lm_head.weight for a tied checkpoint that does not store it (an input that has one may supply it)."""
    return "lm_head.weight" if config.get("tie_word_embeddings", True) else None


def _declared_order(folder: Path, config: dict) -> tuple[dict[str, int] | None, str | None, str | None]:
    """Parameter declaration order of the transformers model for this config (meta device), and the
    names of its input/output embedding weights; (None, None, None) when transformers cannot build it."""
    try:
        import torch
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(folder)
        architecture = (config.get("architectures") or [None])[0]
        model_class = getattr(transformers, architecture, None) if architecture else None
        with torch.device("meta"):
            model = (model_class(cfg) if model_class is not None
                     else transformers.AutoModelForCausalLM.from_config(cfg))
    except Exception:  # unknown or remote-code architectures: fall back to names
        return None, None, None
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers()]
    order = {n: i for i, n in enumerate(dict.fromkeys(names))}
    lookup = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}

    def weight_name(module) -> str | None:
        if module is None or getattr(module, "weight", None) is None:
            return None
        prefix = lookup.get(id(module))
        return f"{prefix}.weight" if prefix else None

    output = None
    try:
        output = weight_name(model.get_output_embeddings())
    except (AttributeError, NotImplementedError):
        pass
    return order, weight_name(model.get_input_embeddings()), output
