"""Where a checkpoint keeps its decoder layers, found from its tensor names and its config.

No list of architectures: the layer prefix is the `<prefix>.<i>.` under which the tensor names count
0..N−1, where N is the config's layer count (num_hidden_layers, or n_layer / num_layers / n_layers for
families that name it so; a multimodal config's text_config holds the language model's). When several
prefixes count N layers (a vision tower as deep as the language model, an encoder and a decoder), the
language model's is the one nearest the input embedding (longest shared name prefix). Non-layer tensors
are split into those before the layers (the input and position embeddings: names with embed / wte /
wpe / word_embeddings, output heads excluded) and those after them (final norm, lm_head). When no name
looks like an embedding, the split follows the order in which the transformers model declares its
parameters (built on the meta device: no memory, no weights; importing the model code is slow, hence
only then). The vocabulary tensors are the input embedding and the output head (lm_head; for tied
checkpoints that lack it, the input embedding stands in).

A multimodal checkpoint's language model is the part under the common prefix of its layers and its input
embedding (`model.language_model.`, `language_model.model.`, ...) plus the output head; everything else
(vision tower, projector) is listed in Layout.other_modules: merged like any tensor, taken whole from one
slice's models, never dropped.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .schema import RecipeError

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# one entry per layer (a hybrid model's layer kinds; SmolLM3's NoPE layers): the layer count when the config
# states none (Nemotron-H), and rebuilt from the source layers after slices
PER_LAYER_KEYS = ("layer_types", "layers_block_type", "no_rope_layers")
LANGUAGE_CONFIGS = ("text_config", "language_config", "llm_config")   # a multimodal config's language model
MODALITY_CONFIGS = ("vision_config", "audio_config", "speech_config") + LANGUAGE_CONFIGS
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
    other_stacks: dict[str, int] = field(default_factory=dict)   # other numbered prefixes → layer count
    language_root: str = ""                       # multimodal: the language model's name prefix
    other_modules: list[str] = field(default_factory=list)       # multimodal: tensors outside the language model

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
    """(key, count) of the language model's layers; a key under a sub-config is dotted (text_config.n); a
    config with no count key but a per-layer list (PER_LAYER_KEYS) has that list's length."""
    sections = [("", config)] + [(f"{sub}.", config[sub]) for sub in LANGUAGE_CONFIGS if isinstance(config.get(sub), dict)]
    for keys, valid in ((LAYER_COUNT_KEYS, lambda v: isinstance(v, int) and not isinstance(v, bool)),
                        (PER_LAYER_KEYS, lambda v: isinstance(v, list) and v)):
        for path, section in sections:
            for key in keys:
                if valid(section.get(key)):
                    value = section[key]
                    return path + key, value if isinstance(value, int) else len(value)
    raise RecipeError(f"{what}: cannot map this architecture ({config.get('architectures')}): its config.json has "
                      f"none of {', '.join(LAYER_COUNT_KEYS)}")


def _block_stack(config: dict, names: list[str], what: str):
    """(count key, count, the block prefix, every numbered prefix's {index: suffixes}, complete stacks): the
    numbered prefix with exactly the config's layer count, nearest the input embedding, then with the most
    tensors (a decoder's cross-attention outnumbers its encoder)."""
    key, count = layer_count(config, what)
    groups: dict[str, dict[int, list[str]]] = {}
    for name in names:
        match = NUMBERED.match(name)
        if match:
            groups.setdefault(match["prefix"], {}).setdefault(int(match["index"]), []).append(match["rest"])
    stacks = {p: len(layers) for p, layers in groups.items() if sorted(layers) == list(range(len(layers)))}
    candidates = [p for p in stacks if stacks[p] == count]
    if not candidates:
        found = {p: len(layers) for p, layers in groups.items()}
        raise RecipeError(f"{what}: cannot map this architecture ({config.get('architectures')}): no tensor prefix "
                          f"numbers {key} = {count} layers 0..{count - 1} (numbered prefixes found: {found})")
    embedding = next((n for n in names if any(w in n for w in VOCAB_WORDS) and not any(w in n for w in OUTPUT_WORDS)),
                     "")
    prefix = max(candidates, key=lambda p: (len(_shared_prefix(p, embedding)),
                                            sum(len(v) for v in groups[p].values())))
    return key, count, prefix, groups, stacks


def block_layers(config: dict, names: list[str], what: str) -> tuple[dict[str, int], int]:
    """Layer-aware methods (LiNeS): each tensor's block index ({name: ℓ}; tensors outside the blocks are
    absent) and the depth L, from the tensor names and the model's config (a dict: config.json's or
    `model.config.to_dict()`), as a recipe's planner finds the layers. RecipeError when no prefix fits."""
    _, count, prefix, groups, _ = _block_stack(config, names, what)
    return {f"{prefix}.{index}.{suffix}": index for index, suffixes in groups[prefix].items()
            for suffix in suffixes}, count


def infer_layout(folder: Path, names: list[str], what: str) -> Layout:
    config = read_config(folder, what)
    key, count, prefix, groups, stacks = _block_stack(config, names, what)
    layout = Layout(Path(folder), config, list(names), key, count, prefix, groups[prefix])
    layout.other_stacks = {p: n for p, n in stacks.items() if p != prefix and n >= 2 and
                           not p.startswith(prefix + ".")}
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
    if any(isinstance(config.get(k), dict) for k in MODALITY_CONFIGS) and layout.input_embedding:
        root = _shared_prefix(prefix, layout.input_embedding)
        layout.language_root = root
        heads = {layout.output_embedding} | {n for n in others if any(w in n for w in OUTPUT_WORDS)}
        layout.other_modules = [n for n in others if not n.startswith(root + ".") and n not in heads] if root else []
        # a tower's patch / position embeddings are not the language model's: they go with the rest of it
        layout.pre = [n for n in layout.pre if n not in layout.other_modules] + layout.other_modules
        layout.post = [n for n in layout.post if n not in layout.other_modules]
    return layout


def _shared_prefix(a: str, b: str) -> str:
    """The dotted components two names share at their start ('model.layers', 'model.embed' → 'model')."""
    shared = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        shared.append(x)
    return ".".join(shared)


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


def layer_index(layout: Layout, name: str) -> int | None:
    """The layer a tensor name belongs to in this layout (None: outside the layers)."""
    head = layout.prefix + "."
    if not name.startswith(head):
        return None
    index = name[len(head):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def recipe_fates(recipe, plan, inputs: dict, copied_modules: list[str] = ()) -> dict:
    """Every input tensor's fate in a recipe plan (utils/engine/accounting.py); a RecipeError names the
    tensors no output uses and no rule of the recipe leaves out. The recipe's rules: with slices, layers
    outside every layer_range of a model are left out, and so are non-layer tensors that the output takes
    from the first slice's models (before the layers) or the last slice's (after them). With --merge_part
    language, the other inputs' copies of `copied_modules` are left out too."""
    from utils.engine.accounting import DropRule, UnaccountedTensors, account

    names = {ref: model.reader.names() for ref, model in inputs.items()}
    outputs = {group.name: dict(group.sources) for group in plan.groups}
    rules = []
    if recipe.slices:
        used: dict[str, set[int]] = {}
        for piece in recipe.slices:
            for source in piece.sources:
                used.setdefault(source.model, set()).update(range(*source.layer_range))

        def outside(ref: str, name: str) -> bool:
            index = layer_index(inputs[ref].layout, name)
            return index is not None and index not in used.get(ref, set())

        def taken_from_others(ref: str, name: str) -> bool:
            return layer_index(inputs[ref].layout, name) is None and name in outputs

        rules = [DropRule("slices: layers outside every layer_range", outside),
                 DropRule("slices: tensors outside the layers taken from the first / last slice's models",
                          taken_from_others)]
    if copied_modules:
        kept = set(copied_modules)
        rules.append(DropRule("--merge_part language: modules outside the language model copied from one model",
                              lambda ref, name: name in kept))
    try:
        return account(names, outputs, rules, hint="merge models that have the same tensors in the same layers")
    except UnaccountedTensors as error:
        raise RecipeError(str(error)) from None


def layer_origins(recipe, inputs: dict) -> list[tuple[str, int]]:
    """(input, layer) each output layer is made from: the lead source of its slice (whose tensor names the
    planner follows); `models:` keeps the donor's layers in place."""
    if not recipe.slices:
        donor = recipe.base_model or recipe.referenced_models()[0]
        return [(donor, index) for index in range(inputs[donor].layout.num_layers)]
    return [(piece.sources[0].model, index) for piece in recipe.slices for index in range(*piece.sources[0].layer_range)]


def output_layers(recipe, inputs: dict, donor: str, config: dict) -> dict:
    """The output config's layer settings after slices: the layer count (in the language sub-config for a
    multimodal model), per-layer lists (PER_LAYER_KEYS: Qwen3-Next's linear / full attention, Gemma's sliding
    windows, LFM2's convolutions, Nemotron-H's block types) taken from the layer each output layer comes from. Refuses slices of a
    model with a second layer stack inside its language model (an encoder-decoder), and slices whose layer
    kinds the config cannot describe (Jamba's periodic pattern)."""
    layout = inputs[donor].layout
    origins = layer_origins(recipe, inputs)
    if recipe.slices:
        inner = [p for p in layout.other_stacks if not layout.other_modules or p.startswith(layout.language_root + ".")]
        if inner:
            raise RecipeError(f"slices: {donor} has two layer stacks ({layout.prefix} and {', '.join(inner)}: an "
                              f"encoder-decoder); slices cut one stack, so they cannot describe its layers "
                              f"(merge it with `models:`)")
    config = json_copy(config)
    section, _, key = layout.layer_key.rpartition(".")
    target = config[section] if section else config
    if not isinstance(target[key], list):     # a per-layer list is rebuilt below instead
        target[key] = len(origins)
    identity = origins == [(donor, index) for index in range(layout.num_layers)]
    if identity:
        return config
    for name, value in list(target.items()):
        if name in PER_LAYER_KEYS and isinstance(value, list) and len(value) == layout.num_layers:
            target[name] = [_per_layer(inputs[ref].layout, section, name, value)[index] for ref, index in origins]
    planned = [frozenset(inputs[ref].layout.layer_suffixes[index]) for ref, index in origins]
    check_layer_kinds(config, planned, donor)
    return config


def json_copy(value):
    return json.loads(json.dumps(value))


def _per_layer(layout: Layout, section: str, name: str, fallback: list) -> list:
    """An input's per-layer list `name` (in its config's `section`), or the donor's when it has none."""
    value = (layout.config.get(section, {}) if section else layout.config).get(name)
    return value if isinstance(value, list) and len(value) == layout.num_layers else fallback


def _signature(suffixes) -> frozenset:
    """What kind of layer a set of tensor suffixes makes: their first two name components
    (self_attn.q_proj, mlp.experts, linear_attn.A_log, ...); the experts' numbers and fused forms agree."""
    return frozenset(".".join(s.split(".")[:2]) for s in suffixes)


def check_layer_kinds(config: dict, planned: list[frozenset], what: str) -> None:
    """The output config must make each output layer the kind the plan fills it with. Skipped when every
    planned layer is of one kind (nothing to get wrong). Otherwise transformers builds the output model on
    the meta device and its layers' kinds are compared with the planned ones: each planned kind must be
    matched to one expected kind, layer by layer, and to the most similar one (names differ between the
    module and checkpoint formats, e.g. fused experts)."""
    kinds = [_signature(layer) for layer in planned]
    if len(set(kinds)) == 1:
        return
    expected = _meta_layer_kinds(config, len(planned), set().union(*kinds))
    if expected is None:
        return        # transformers cannot build it: the kinds are not checked (remote code)
    pairs: dict[frozenset, frozenset] = {}
    similarity = lambda a, b: len(a & b) / max(1, len(a | b))  # noqa: E731
    for index, (have, want) in enumerate(zip(kinds, expected)):
        best = max(set(expected), key=lambda k: similarity(have, k))
        if pairs.setdefault(have, want) != want or similarity(have, want) < similarity(have, best):
            raise RecipeError(
                f"slices: output layer {index} would hold {_describe(have - want, want)} where the output config "
                f"({(config.get('architectures') or ['?'])[0]}) puts {_describe(want - have, have)}: these slices "
                f"break "
                f"{what}'s pattern of layer kinds, which its config cannot describe; choose layer ranges that "
                f"keep the pattern")


def _describe(kind: frozenset, other: frozenset) -> str:
    """The module names of a layer kind: 'mamba.*' for a module the other kind lacks, else its parts."""
    shared = {p.split(".")[0] for p in other}
    parts = {p if p.split(".")[0] in shared else p.split(".")[0] + ".*" for p in kind}
    return ", ".join(sorted(parts)) or "nothing else"


def _meta_layer_kinds(config: dict, count: int, planned: set) -> list[frozenset] | None:
    """Per layer, the kinds of the model this config builds (meta device: no memory), for the numbered
    stack of `count` layers most like the planned ones; None when transformers cannot build it."""
    try:
        import torch
        import transformers

        values = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
        cfg = transformers.AutoConfig.for_model(config["model_type"], **values)
        architecture = (config.get("architectures") or [None])[0]
        model_class = getattr(transformers, architecture, None) if architecture else None
        with torch.device("meta"):
            model = (model_class(cfg) if model_class is not None
                     else transformers.AutoModelForCausalLM.from_config(cfg))
    except Exception:  # unknown or remote-code architectures
        return None
    stacks: dict[str, dict[int, set]] = {}
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        match = NUMBERED.match(name)
        if match:
            stacks.setdefault(match["prefix"], {}).setdefault(int(match["index"]), set()).add(match["rest"])
    candidates = [layers for layers in stacks.values() if sorted(layers) == list(range(count))]
    if not candidates:
        return None
    best = max(candidates, key=lambda layers: len(planned & set().union(*(_signature(s) for s in layers.values()))))
    return [_signature(best[index]) for index in range(count)]


def other_module_prefixes(layout: Layout) -> list[str]:
    """The name prefixes of a multimodal checkpoint's modules outside its language model ('visual.',
    'model.visual.', 'vision_tower.', 'multi_modal_projector.'): each other tensor's name up to the first
    component where it leaves the language model's root."""
    root = layout.language_root.split(".") if layout.language_root else []
    prefixes = []
    for name in layout.other_modules:
        parts = name.split(".")
        shared = next((i for i, (a, b) in enumerate(zip(parts, root)) if a != b), min(len(parts), len(root)))
        prefixes.append(".".join(parts[:shared + 1]) + ".")
    return list(dict.fromkeys(prefixes))


def language_only_regex(folder, names: list[str], what: str) -> str | None:
    """--merge_part language for the flag engine: one regex (re.match) of the tensors outside the language
    model, which are then copied from the reference like --exclude_param_names_regex; None when the
    checkpoint has nothing outside its language model (a text-only model)."""
    prefixes = other_module_prefixes(infer_layout(folder, names, what))
    return "(?:" + "|".join(re.escape(p) for p in prefixes) + ")" if prefixes else None


def language_only(plan, inputs: dict, keep: str) -> list[str]:
    """--merge_part language for recipes: every output tensor of a module outside the language model is
    copied from `keep` (the base model, else the donor) instead of merged; returns their names."""
    layout = inputs[plan.donor].layout
    outside = set(layout.other_modules)
    copied = []
    for group in plan.groups:
        if group.name in outside and keep in group.sources:
            group.sources = {keep: group.sources[keep]}
            group.base, group.passthrough, group.params, group.per_input = None, True, {}, {}
            copied.append(group.name)
    return copied
