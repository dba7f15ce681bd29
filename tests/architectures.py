"""The architecture coverage matrix, as data: every architecture the tests build (tiny, random, from its
transformers config class: no download), and per operation whether it works or is refused, and why.

tests/test_architecture_matrix.py runs every cell; the matrix in docs/architectures.md is rendered from this file
(`render_matrix`), and a test checks that docs/architectures.md holds exactly that table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# column key → header of the matrix in docs/architectures.md
OPERATIONS = {
    "flags": "flags: TA, TIES, DARE",
    "slices": "recipe: passthrough slices",
    "gradient": "recipe: slerp gradient",
    "analysis": "task-vector analysis",
    "moe": "MoE build",
}
TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ENCODER = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=66, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY_VISION_QWEN = dict(depth=3, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16, patch_size=2,
                        spatial_merge_size=1, temporal_patch_size=1)
TINY_VISION_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                        image_size=8, patch_size=4)
LINEAR_ATTENTION = dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                        linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)


@dataclass(frozen=True)
class Refusal:
    reason: str                     # the matrix cell
    message: str                    # a substring of the exit-2 error


MOE_REFUSED = Refusal("no mergekit-moe layout takes this model type (Mixtral, Qwen2-MoE and Qwen3-MoE are built "
                      "from Llama, Mistral, Qwen2, Qwen3)", "no MoE layout is built from model_type")
SLICES_TWO_STACKS = Refusal("an encoder-decoder has two layer stacks; slices cut one", "has two layer stacks")
SLICES_PATTERN = Refusal("the config fixes which layers are Mamba / attention / MoE by period; these slices "
                         "break that pattern", "pattern of layer kinds")


def text(**changes) -> dict:
    return {**TEXT, **changes}


@dataclass(frozen=True)
class Architecture:
    key: str                        # test id
    label: str                      # matrix row
    config_class: str               # transformers configuration class
    model_class: str                # transformers model class saved (config.architectures[0])
    auto_class: str                 # the Auto class that must load a merge of it
    config: dict
    stacks: dict[str, int]          # the layer stacks the task-vector analysis must find (prefix → layers)
    layers: str                     # the layer prefix recipes slice (the language model's)
    refused: dict[str, Refusal] = field(default_factory=dict)   # operation → why it exits 2
    other_modules: tuple[str, ...] = ()   # multimodal: name prefixes of the modules outside the language model

    @property
    def multimodal(self) -> bool:
        return bool(self.other_modules)

    def status(self, operation: str) -> str:
        return f"refused: {self.refused[operation].reason}" if operation in self.refused else "works"


def _causal(key, label, stem, config, layers="model.layers", moe=False, refused=None) -> Architecture:
    """A decoder-only language model <stem>ForCausalLM; `moe`: mergekit-moe's families build a MoE from it."""
    refused = ({} if moe else {"moe": MOE_REFUSED}) | (refused or {})
    return Architecture(key, label, f"{stem}Config", f"{stem}ForCausalLM", "AutoModelForCausalLM", config,
                        {layers: config.get("num_hidden_layers", 2)}, layers, refused)


ARCHITECTURES = [
    _causal("llama", "Llama", "Llama", text(tie_word_embeddings=False), moe=True),
    _causal("mistral", "Mistral", "Mistral", text(), moe=True),
    _causal("mixtral", "Mixtral (MoE)", "Mixtral", text(num_local_experts=2, num_experts_per_tok=1)),
    _causal("qwen2", "Qwen2 / Qwen2.5", "Qwen2", text(), moe=True),
    _causal("qwen2_moe", "Qwen2-MoE", "Qwen2Moe", text(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                                                         shared_expert_intermediate_size=16)),
    _causal("qwen3", "Qwen3", "Qwen3", text(head_dim=8), moe=True),
    _causal("qwen3_moe", "Qwen3-MoE", "Qwen3Moe", text(head_dim=8, num_experts=2, num_experts_per_tok=1,
                                                        moe_intermediate_size=16)),
    _causal("qwen3_next", "Qwen3-Next (hybrid linear attention, MoE)", "Qwen3Next",
            text(head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                 shared_expert_intermediate_size=16, **LINEAR_ATTENTION)),
    _causal("gemma2", "Gemma 2", "Gemma2", text(head_dim=8)),
    Architecture("gemma3_text", "Gemma 3 (text)", "Gemma3TextConfig", "Gemma3ForCausalLM", "AutoModelForCausalLM",
                 text(head_dim=8), {"model.layers": 2}, "model.layers", {"moe": MOE_REFUSED}),
    _causal("phi3", "Phi-3", "Phi3", text()),
    Architecture("gpt2", "GPT-2", "GPT2Config", "GPT2LMHeadModel", "AutoModelForCausalLM",
                 dict(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2),
                 {"transformer.h": 2}, "transformer.h", {"moe": MOE_REFUSED}),
    _causal("gpt_neox", "GPT-NeoX", "GPTNeoX", text(), layers="gpt_neox.layers"),
    _causal("falcon", "Falcon", "Falcon", dict(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                               num_attention_heads=2, bos_token_id=1, eos_token_id=2),
            layers="transformer.h"),
    _causal("olmo2", "OLMo 2", "Olmo2", text()),
    _causal("deepseek_v3", "DeepSeek-V3 (MoE + MLA)", "DeepseekV3",
            text(first_k_dense_replace=1, n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                 kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1,
                 topk_group=1)),
    _causal("jamba", "Jamba (hybrid Mamba, MoE)", "Jamba",
            text(num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
                 expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4),
            refused={"slices": SLICES_PATTERN}),
    _causal("lfm2", "LFM2 (hybrid convolution)", "Lfm2", text(layer_types=["conv", "full_attention"])),
    _causal("nemotron_h", "Nemotron-H (hybrid Mamba-2)", "NemotronH", layers="backbone.layers",
            config=text(layers_block_type=["mamba", "attention"], head_dim=8, mamba_num_heads=4, mamba_head_dim=8,
                 ssm_state_size=8, n_groups=1, expand=2, chunk_size=8)),
    Architecture("bert", "BERT", "BertConfig", "BertModel", "AutoModel", ENCODER, {"encoder.layer": 2},
                 "encoder.layer", {"moe": MOE_REFUSED}),
    Architecture("roberta", "RoBERTa", "RobertaConfig", "RobertaForMaskedLM", "AutoModelForMaskedLM", ENCODER,
                 {"roberta.encoder.layer": 2}, "roberta.encoder.layer", {"moe": MOE_REFUSED}),
    Architecture("t5", "T5", "T5Config", "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM",
                 dict(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, pad_token_id=0,
                      eos_token_id=2, decoder_start_token_id=0),
                 {"encoder.block": 2, "decoder.block": 2}, "decoder.block",
                 {"moe": MOE_REFUSED, "slices": SLICES_TWO_STACKS, "gradient": SLICES_TWO_STACKS}),
    Architecture("qwen2_vl", "Qwen2-VL", "Qwen2VLConfig", "Qwen2VLForConditionalGeneration",
                 "AutoModelForImageTextToText",
                 dict(text_config=text(rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]}),
                      vision_config=dict(depth=3, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2,
                                         patch_size=2, spatial_merge_size=1, temporal_patch_size=1),
                      image_token_id=63, video_token_id=62, vision_start_token_id=61),
                 {"model.layers": 2, "visual.blocks": 3}, "model.layers", {"moe": MOE_REFUSED}, ("visual.",)),
    Architecture("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration",
                 "AutoModelForImageTextToText",
                 dict(text_config=text(rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]}),
                      vision_config=dict(TINY_VISION_QWEN, fullatt_block_indexes=[1], window_size=4),
                      image_token_id=63, video_token_id=62, vision_start_token_id=61),
                 {"model.layers": 2, "visual.blocks": 3}, "model.layers", {"moe": MOE_REFUSED}, ("visual.",)),
    Architecture("qwen3_vl", "Qwen3-VL", "Qwen3VLConfig", "Qwen3VLForConditionalGeneration",
                 "AutoModelForImageTextToText",
                 dict(text_config=text(head_dim=8, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]}),
                      vision_config=dict(TINY_VISION_QWEN, num_position_embeddings=16, deepstack_visual_indexes=[1]),
                      image_token_id=63, video_token_id=62, vision_start_token_id=61),
                 {"model.language_model.layers": 2, "model.visual.blocks": 3}, "model.language_model.layers",
                 {"moe": MOE_REFUSED}, ("model.visual.",)),
    Architecture("llava", "LLaVA", "LlavaConfig", "LlavaForConditionalGeneration", "AutoModelForImageTextToText",
                 dict(text_config=dict(model_type="llama", **text()),
                      vision_config=dict(model_type="clip_vision_model", projection_dim=16, **TINY_VISION_CLIP),
                      image_token_id=63),
                 {"language_model.model.layers": 2, "vision_tower.encoder.layers": 3},
                 "language_model.model.layers", {"moe": MOE_REFUSED}, ("multi_modal_projector.", "vision_tower.")),
    Architecture("gemma3", "Gemma 3 (multimodal)", "Gemma3Config", "Gemma3ForConditionalGeneration",
                 "AutoModelForImageTextToText",
                 dict(text_config=text(head_dim=8), vision_config=TINY_VISION_CLIP, mm_tokens_per_image=4,
                      image_token_index=63, boi_token_index=61, eoi_token_index=62),
                 {"language_model.model.layers": 2, "vision_tower.encoder.layers": 3},
                 "language_model.model.layers", {"moe": MOE_REFUSED}, ("multi_modal_projector.", "vision_tower.")),
    Architecture("qwen3_5_moe", "Qwen3.5-MoE (multimodal, hybrid)", "Qwen3_5MoeConfig",
                 "Qwen3_5MoeForConditionalGeneration", "AutoModelForImageTextToText",
                 dict(text_config=text(head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                                       shared_expert_intermediate_size=16, **LINEAR_ATTENTION),
                      vision_config=TINY_VISION_QWEN, image_token_id=63, video_token_id=62,
                      vision_start_token_id=61),
                 {"model.language_model.layers": 2, "model.visual.blocks": 3}, "model.language_model.layers",
                 {"moe": MOE_REFUSED}, ("model.visual.",)),
]
BY_KEY = {a.key: a for a in ARCHITECTURES}


def build_config(architecture: Architecture):
    import transformers

    return getattr(transformers, architecture.config_class)(**architecture.config)


def save_family(architecture: Architecture, root: Path, names=("base", "ft0", "ft1"), seed: int = 0) -> dict[str, Path]:
    """The base (random init, seed) and fine-tunes (base + 0.01·N(0, 1) on every floating tensor) of an
    architecture, saved with save_pretrained (the checkpoint format of its published models)."""
    import torch
    import transformers

    config = build_config(architecture)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture.model_class)(config).eval()
    folders = {}
    for index, name in enumerate(names):
        if index:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.01 * torch.randn_like(parameter))
        model.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def dummy_inputs(architecture: Architecture) -> dict:
    """Token ids a forward pass takes (text only: multimodal models run their language path)."""
    import torch

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if architecture.auto_class == "AutoModelForSeq2SeqLM":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 9]])
    return inputs


def render_matrix() -> str:
    """The matrix of docs/architectures.md: one row per architecture, one column per operation."""
    header = "| architecture | " + " | ".join(OPERATIONS.values()) + " |"
    rule = "| --- |" + " --- |" * len(OPERATIONS)
    rows = [f"| {a.label} | " + " | ".join(a.status(o) for o in OPERATIONS) + " |" for a in ARCHITECTURES]
    return "\n".join([header, rule, *rows])
