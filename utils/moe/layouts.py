"""Output layouts of a mixture of experts built from dense decoders: tensor names and config per architecture.

Each layout is one declaration (data, no branching elsewhere): which dense model types it accepts, where
an expert's gate/up/down projections go, the router's name, the shared expert (Qwen2-MoE), tensors the
base may carry besides the MLP, and the MoE fields of the output config. Tensor names follow what
mergekit-moe 0.1.5 writes with transformers 5 (so tools that read names see the same checkpoint): Mixtral and
Qwen3-MoE in the fused layout of transformers 5 (``mlp.experts.gate_up_proj`` of shape (E, 2I, d) with expert
e's gate rows then its up rows, ``mlp.experts.down_proj`` (E, d, I), the router ``mlp.gate.weight``), Qwen2-MoE
per expert (``mlp.experts.3.gate_proj.weight``), as mergekit-moe's Qwen2 writer copies them; transformers 5
fuses those on load.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MLP_TENSOR = re.compile(r"^(?P<prefix>model\.layers\.(?P<layer>\d+)\.)mlp\.(?P<proj>gate_proj|up_proj|down_proj)"
                        r"\.weight$")
COMMON_TENSORS = (r"model\.embed_tokens\.weight", r"model\.norm\.weight", r"lm_head\.weight",
                  r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
                  r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight")
# dropped from the base's config: identity keys, and sliding-window settings (mergekit-moe turns the window off)
DROPPED_CONFIG_KEYS = {"model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
                       "layer_types", "sliding_window", "use_sliding_window", "max_window_layers"}


@dataclass(frozen=True)
class Layout:
    name: str
    config_class: str                     # transformers configuration class of the output
    model_class: str                      # config.architectures[0] of the output
    base_model_types: tuple[str, ...]     # dense model_type values this layout is built from
    shared_experts: int                   # how many shared experts the layout has (exactly)
    expert: str                           # one expert's tensor, relative to "model.layers.N." (per-expert name)
    projections: dict[str, str]           # dense projection -> expert projection name
    router: str
    shared_expert: str | None = None
    shared_router: str | None = None
    zero_filled: tuple[str, ...] = ()     # per-layer tensors the layout needs; zeros when the base lacks them
    extra_tensors: tuple[str, ...] = ()   # regexes of other base tensors the layout has a place for
    moe_fields: dict = field(default_factory=dict)  # fixed config values; see output_config for the counts
    experts_key: str = "num_experts"
    fused: bool = False                   # experts written as transformers 5's fused gate_up_proj / down_proj

    def expert_name(self, prefix: str, expert: int, projection: str) -> str:
        return prefix + self.expert.format(expert=expert, proj=self.projections[projection]) + ".weight"

    def fused_name(self, prefix: str, projection: str) -> str:
        """The fused tensor a projection goes into: "gate_up_proj" (gate_proj, up_proj) or "down_proj"."""
        return prefix + ("mlp.experts.down_proj" if projection == "down_proj" else "mlp.experts.gate_up_proj")

    def shared_name(self, prefix: str, projection: str) -> str:
        return prefix + self.shared_expert.format(proj=projection) + ".weight"

    def router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.router}.weight"

    def shared_router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.shared_router}.weight"

    def accepts(self, name: str) -> bool:
        """Whether a non-MLP base tensor has a place (same name) in this layout."""
        return any(re.fullmatch(pattern, name) for pattern in COMMON_TENSORS + self.extra_tensors)


LAYOUTS = {
    "mixtral": Layout(
        name="mixtral", config_class="MixtralConfig", model_class="MixtralForCausalLM",
        base_model_types=("llama", "mistral"), shared_experts=0,
        expert="mlp.experts.{expert}.{proj}",
        projections={"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
        router="mlp.gate", experts_key="num_local_experts", fused=True),
    "qwen2_moe": Layout(
        name="qwen2_moe", config_class="Qwen2MoeConfig", model_class="Qwen2MoeForCausalLM",
        base_model_types=("llama", "mistral", "qwen2"), shared_experts=1,
        expert="mlp.experts.{expert}.{proj}", projections={p: p for p in PROJECTIONS}, router="mlp.gate",
        shared_expert="mlp.shared_expert.{proj}", shared_router="mlp.shared_expert_gate",
        # Qwen2-MoE attention always has q/k/v biases (vLLM builds them unconditionally): zeros for a Llama base
        zero_filled=("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        extra_tensors=(r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.bias",),
        moe_fields={"decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": [], "qkv_bias": True,
                    "use_sliding_window": False, "sliding_window": None}),
    "qwen3_moe": Layout(
        name="qwen3_moe", config_class="Qwen3MoeConfig", model_class="Qwen3MoeForCausalLM",
        base_model_types=("qwen3",), shared_experts=0,
        expert="mlp.experts.{expert}.{proj}", projections={p: p for p in PROJECTIONS}, router="mlp.gate",
        fused=True,
        extra_tensors=(r"model\.layers\.\d+\.self_attn\.[qk]_norm\.weight",
                       r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.bias"),
        moe_fields={"decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": [],
                    "use_sliding_window": False, "sliding_window": None}),
}


def default_architecture(model_type: str, shared_experts: int) -> str | None:
    """mergekit-moe's choice: Mixtral for Llama/Mistral bases (Qwen2-MoE when a shared expert is asked for),
    Qwen2-MoE for Qwen2, Qwen3-MoE for Qwen3; None when no layout takes the base."""
    if model_type in ("llama", "mistral"):
        return "qwen2_moe" if shared_experts else "mixtral"
    return {"qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}.get(model_type)


def output_config(layout: Layout, base_config, num_experts: int, experts_per_token: int, dtype: str):
    """The output's transformers config: the base's keys that the MoE class knows, plus the MoE fields.

    Experts keep the dense MLP width (intermediate_size; Qwen's moe/shared_expert_intermediate_size), and
    the top-k routing weights are renormalised to sum to one (Mixtral always does; norm_topk_prob for Qwen)."""
    import transformers

    config_class = getattr(transformers, layout.config_class)
    known = set(config_class().to_dict())
    values = {key: value for key, value in base_config.to_dict().items()
              if key in known and key not in DROPPED_CONFIG_KEYS}
    values.update(layout.moe_fields)
    values[layout.experts_key] = num_experts
    values["num_experts_per_tok"] = experts_per_token
    if layout.name != "mixtral":
        values["moe_intermediate_size"] = base_config.intermediate_size
    if layout.shared_expert is not None:
        values["shared_expert_intermediate_size"] = base_config.intermediate_size
    config = config_class(**values)
    config.architectures = [layout.model_class]
    config.dtype = dtype
    return config
