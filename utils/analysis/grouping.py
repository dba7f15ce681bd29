"""Where a tensor sits in a transformer: its layer (from the names and the config) and its kind.

Layer stacks are found, not listed: a stack is a name prefix followed by an integer segment
(``model.layers.N``, ``encoder.layer.N``, ``transformer.h.N``, ``transformer.blocks.N``,
``encoder.block.N`` ...) whose indices are exactly 0..n−1 with n one of the config's layer counts
(``num_hidden_layers``, ``n_layer``, ``num_layers``, a vision tower's ``depth``, the length of a per-layer
list such as ``layers_block_type``, ...; nested sub-configs included). Without a config, or when no prefix matches its counts, every prefix with contiguous indices
0..n−1, n ≥ 2, is a stack (and a warning says so). Tensors outside every stack belong to the group NO_LAYER.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

NO_LAYER = "no layer"
KINDS = ("embedding", "attention", "mlp", "norm", "head", "other")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers", "depth",
                    "encoder_layers", "decoder_layers", "num_encoder_layers")
LAYER_LIST_KEYS = ("layer_types", "layers_block_type", "no_rope_layers")   # one entry per layer (Nemotron-H: no count)
INDEXED = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)(?=\.|$)")

# First matching rule wins: norms inside attention blocks are norms, heads are checked before the
# embedding rule (GPT-NeoX's embed_out is the LM head), attention before MLP (BERT's attention.output.dense).
KIND_RULES = (
    ("norm", re.compile(r"norm|(^|\.)ln(_\w+)?(\.|$)")),
    ("head", re.compile(r"(^|\.)(lm_head|embed_out|classifier|score|pooler|qa_outputs|cls|head|heads)(\.|$)")),
    ("embedding", re.compile(r"embed|(^|\.)(wte|wpe|shared)(\.|$)")),
    ("attention", re.compile(r"attn|attention|(^|\.)(q|k|v|o|qkv|kv)_proj(\.|$)|(^|\.)(query|key|value|wqkv|wq|wk|wv)(\.|$)")),
    ("mlp", re.compile(r"mlp|ffn|feed_?forward|intermediate|densereludense|experts|(^|\.)(gate_proj|up_proj|"
                       r"down_proj|gate_up_proj|fc\d*|c_fc|c_proj|w[123]|wi(_\d)?|wo|output)(\.|$)")),
)


def kind_of(name: str) -> str:
    """embedding, attention, mlp, norm, head or other, from the tensor name (case-insensitive)."""
    lowered = name.lower()
    for kind, pattern in KIND_RULES:
        if pattern.search(lowered):
            return kind
    return "other"


def config_layer_counts(config: dict | None) -> set[int]:
    """Every positive integer under a layer-count key of the config or of its nested sub-configs."""
    counts: set[int] = set()
    if not isinstance(config, dict):
        return counts
    for key, value in config.items():
        if key in LAYER_COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            counts.add(value)
        elif key in LAYER_LIST_KEYS and isinstance(value, list) and value:
            counts.add(len(value))
        elif isinstance(value, dict):
            counts |= config_layer_counts(value)
    return counts


@dataclass
class LayerGrouping:
    stacks: dict[str, int]                       # prefix → number of layers, in order of appearance
    config_counts: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_names(cls, names: list[str], config: dict | None = None) -> "LayerGrouping":
        indices: dict[str, set[int]] = {}
        for name in names:
            match = INDEXED.match(name)
            if match:
                indices.setdefault(match["prefix"], set()).add(int(match["index"]))
        contiguous = {p: len(s) for p, s in indices.items() if s == set(range(len(s)))}
        counts = config_layer_counts(config)
        stacks = {p: n for p, n in contiguous.items() if n in counts}
        warnings = []
        if not stacks:
            stacks = {p: n for p, n in contiguous.items() if n >= 2}
            if counts:
                warnings.append(f"no name prefix has exactly {sorted(counts)} layers (the config's counts); "
                                f"layer stacks guessed from the names: {sorted(stacks) or 'none'}")
            elif stacks:
                warnings.append(f"no layer count in the config; layer stacks guessed from the names: {sorted(stacks)}")
        return cls(stacks, sorted(counts), warnings)

    def layer_of(self, name: str) -> str:
        """'N' for layer N of the only stack, '<prefix>.N' when there are several, else NO_LAYER."""
        match = INDEXED.match(name)
        if not match or match["prefix"] not in self.stacks:
            return NO_LAYER
        return match["index"] if len(self.stacks) == 1 else f"{match['prefix']}.{match['index']}"

    def layer_order(self) -> list[str]:
        """Every layer label in network order (stacks in order of appearance), then NO_LAYER."""
        if len(self.stacks) == 1:
            labels = [str(i) for i in range(next(iter(self.stacks.values())))]
        else:
            labels = [f"{prefix}.{i}" for prefix, n in self.stacks.items() for i in range(n)]
        return labels + [NO_LAYER]

    def to_json(self) -> dict:
        return {"stacks": self.stacks, "config_layer_counts": self.config_counts, "warnings": self.warnings}
