"""merge_moe.py on tiny random Llama / Qwen2 / Qwen3 checkpoints built here: exact equivalence with the dense
model when one expert is repeated, the router formulas, seeded gates, the written files, and bad inputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import merge_moe
from utils.moe import parse_moe_config

WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(60)]
MLP = ("gate_proj", "up_proj", "down_proj")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "moe"


def save_word_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over WORDS (ids 0..63, BOS = 1): prompts are space-separated words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(folder)


def save_tiny_decoder(folder: Path, kind: str, seed: int, base: Path | None = None, tie: bool = False,
                      intermediate: int = 32) -> Path:
    """A 2-layer decoder (llama, mistral, qwen2 or qwen3; d = 16) initialised with std 0.2 so that every block matters
    to the logits; with `base`, the base's weights plus 0.05·N(0, 1) (a "fine-tune")."""
    import transformers

    config_class, model_class = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                                 "mistral": ("MistralConfig", "MistralForCausalLM"),
                                 "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                                 "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[kind]
    config = getattr(transformers, config_class)(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():
        if base is not None:
            model.load_state_dict(getattr(transformers, model_class).from_pretrained(base).state_dict())
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") and base is None:
                parameter.normal_(1.0, 0.2)
            elif base is not None:
                parameter.add_(0.05 * torch.randn_like(parameter))
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    save_word_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_zoo")
    folders = {}
    for kind in ("llama", "mistral", "qwen2", "qwen3"):
        base = save_tiny_decoder(root / f"{kind}_base", kind, seed=0)
        folders[f"{kind}_base"] = base
        folders[f"{kind}_ft0"] = save_tiny_decoder(root / f"{kind}_ft0", kind, 1, base)
        if kind != "mistral":
            folders[f"{kind}_ft1"] = save_tiny_decoder(root / f"{kind}_ft1", kind, 2, base)
    tied = save_tiny_decoder(root / "llama_tied_base", "llama", seed=3, tie=True)
    folders["llama_tied_base"] = tied
    folders["llama_tied_ft0"] = save_tiny_decoder(root / "llama_tied_ft0", "llama", 4, tied, tie=True)
    folders["llama_wide"] = save_tiny_decoder(root / "llama_wide", "llama", 5, intermediate=48)
    return folders


def build(tmp_path: Path, config: dict, *extra: str, name: str = "moe") -> tuple[int, Path]:
    config_path = tmp_path / f"{name}.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / name
    return merge_moe.main([str(config_path), "--output_dir", str(out), "--no_progress", *extra]), out


def load_moe(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def dense_with_mlp(base: Path, mlp_source: Path, residual_scale: float = 1.0):
    """The base model with every MLP replaced by `mlp_source`'s (down_proj scaled): what a MoE of one repeated
    expert must compute."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    source = load_file(mlp_source / "model.safetensors")
    mlp = {name: tensor * (residual_scale if "down_proj" in name else 1.0) for name, tensor in source.items()
           if ".mlp." in name}
    missing, unexpected = model.load_state_dict(mlp, strict=False)
    assert not unexpected and len(mlp) == 3 * model.config.num_hidden_layers
    return model


TOKENS = torch.tensor([[1, 7, 12, 33, 9, 41, 5, 22], [1, 50, 3, 17, 17, 60, 2, 8]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("kind, architecture, shared", [
    ("llama", "mixtral", False),
    ("llama_tied", "mixtral", False),
    ("mistral", "mixtral", False),
    ("llama", "qwen2_moe", True),
    ("qwen2", "qwen2_moe", True),
    ("qwen3", "qwen3_moe", False),
])
def test_one_expert_repeated_equals_the_dense_model(zoo, tmp_path, kind, architecture, shared):
    """E copies of one expert with top-k renormalised routing weights: Σ_k w_k·MLP(x) = MLP(x) whatever the
    (uniform_random) router does. Qwen2-MoE adds sigmoid(g·x)·shared(x); it is exactly zero when the shared
    expert's down_proj is scaled by residual_scale 0, so the equality holds there too."""
    base, ft0 = zoo[f"{kind}_base"], zoo[f"{kind}_ft0"]
    config = {"base_model": str(base), "architecture": architecture, "gate_mode": "uniform_random",
              "experts_per_token": 2, "experts": [{"source_model": str(ft0)}] * 4}
    if shared:
        config["shared_experts"] = [{"source_model": str(zoo[f"{kind}_ft1"]), "residual_scale": 0.0}]
    code, out = build(tmp_path, config, "--seed", "5")
    assert code == 0
    moe = load_moe(out)
    assert type(moe).__name__ == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                                  "qwen3_moe": "Qwen3MoeForCausalLM"}[architecture]
    expected = logits(dense_with_mlp(base, ft0))
    got = logits(moe)
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-5), (got - expected).abs().max()
    # the check can fail: the base's own MLPs (or a live shared expert) give clearly different logits
    assert (logits(dense_with_mlp(base, base)) - expected).abs().max() > 1e-2
    written = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in written) == (kind != "llama_tied")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == (kind == "llama_tied")
    if shared:
        config["shared_experts"] = [{"source_model": str(zoo[f"{kind}_ft1"])}]
        code, live = build(tmp_path, config, name="live_shared")
        assert code == 0 and (logits(load_moe(live)) - expected).abs().max() > 1e-3


def test_residual_scale_scales_the_expert_output(zoo, tmp_path):
    """residual_scale r multiplies down_proj: a MoE of one repeated expert then equals the dense model with
    r·down_proj (mergekit-moe skips this for Mixtral outputs)."""
    base, ft0 = zoo["llama_base"], zoo["llama_ft0"]
    config = {"base_model": str(base), "gate_mode": "random", "experts_per_token": 1,
              "experts": [{"source_model": str(ft0), "residual_scale": 0.5}] * 2}
    code, out = build(tmp_path, config)
    assert code == 0
    written = load_file(out / "model.safetensors")
    source = load_file(ft0 / "model.safetensors")
    gate, up = source["model.layers.1.mlp.gate_proj.weight"], source["model.layers.1.mlp.up_proj.weight"]
    # transformers 5's fused layout, as mergekit-moe 0.1.5 writes it: (E, 2I, d) with gate rows then up rows
    assert torch.equal(written["model.layers.1.mlp.experts.down_proj"][1],
                       source["model.layers.1.mlp.down_proj.weight"] * 0.5)
    assert torch.equal(written["model.layers.1.mlp.experts.gate_up_proj"][1], torch.cat([gate, up]))
    assert not any("block_sparse_moe" in name or ".experts.0." in name for name in written)
    assert torch.allclose(logits(load_moe(out)), logits(dense_with_mlp(base, ft0, 0.5)), atol=2e-5)


def test_qwen2_moe_layer_is_routed_experts_plus_gated_shared_expert(zoo, tmp_path):
    """One sparse block checked against its definition with the dense MLPs:
    y = Σ_top-k w_k·MLP_ft0(x) + sigmoid(g_shared·x)·MLP_ft1(x), where all routed experts are ft0."""
    from transformers import AutoModelForCausalLM

    base, ft0, ft1 = zoo["qwen2_base"], zoo["qwen2_ft0"], zoo["qwen2_ft1"]
    config = {"base_model": str(base), "gate_mode": "hidden", "experts_per_token": 1,
              "experts": [{"source_model": str(ft0), "positive_prompts": ["w4 w5"]},
                          {"source_model": str(ft0), "positive_prompts": ["w30 w31"]}],
              "shared_experts": [{"source_model": str(ft1), "positive_prompts": ["w50 w51 w52"]}]}
    code, out = build(tmp_path, config)
    assert code == 0
    block = load_moe(out).model.layers[1].mlp
    gate = load_file(out / "model.safetensors")["model.layers.1.mlp.shared_expert_gate.weight"]
    assert gate.shape == (1, 16) and torch.isclose(gate.float().norm(), torch.tensor(1.0), atol=1e-2)  # bfloat16 rows
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0))
    dense0 = AutoModelForCausalLM.from_pretrained(ft0).model.layers[1].mlp
    dense1 = AutoModelForCausalLM.from_pretrained(ft1).model.layers[1].mlp
    with torch.no_grad():
        expected = dense0(x) + torch.sigmoid(x @ gate.T) * dense1(x)
        assert torch.allclose(block(x), expected, atol=1e-5)


def hidden_inputs(base: Path, prompts: list[str]) -> torch.Tensor:
    """(L, d): mean over prompts of the token-averaged input of each layer, computed independently."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = {w: i for i, w in enumerate(WORDS)}
    summaries = []
    for prompt in prompts:
        tokens = torch.tensor([[1] + [ids[w] for w in prompt.split()]])
        with torch.no_grad():
            states = model(input_ids=tokens, output_hidden_states=True).hidden_states
        summaries.append(torch.stack([s[0].mean(dim=0) for s in states[:-1]]))
    return torch.stack(summaries).mean(dim=0)


MATH = ["w4 w5 w6 w7", "w8 w9 w4 w10", "w5 w6 w11"]
CODE = ["w30 w31 w32", "w40 w41 w33 w30", "w34 w31 w42"]


def routed_fraction(model, prompts: list[str]) -> torch.Tensor:
    """Per expert, the fraction of (token, layer) pairs whose top-1 router logit picks it."""
    ids = {w: i for i, w in enumerate(WORDS)}
    counts = torch.zeros(model.config.num_local_experts)
    for prompt in prompts:
        tokens = torch.tensor([[1] + [ids[w] for w in prompt.split()]])
        with torch.no_grad():
            router_logits = model(input_ids=tokens, output_router_logits=True).router_logits
        for layer_logits in router_logits:
            counts += torch.bincount(layer_logits.argmax(dim=-1), minlength=len(counts))
    return counts / counts.sum()


@pytest.mark.parametrize("mode", ["hidden", "hidden_mean"])
def test_hidden_gates_follow_the_formula_and_route_prompts_to_their_expert(zoo, tmp_path, mode):
    base = zoo["llama_base"]
    config = {"base_model": str(base), "gate_mode": mode, "experts_per_token": 1,
              "experts": [{"source_model": str(zoo["llama_ft0"]), "positive_prompts": MATH,
                           "negative_prompts": CODE},
                          {"source_model": str(zoo["llama_ft1"]), "positive_prompts": CODE,
                           "negative_prompts": MATH}]}
    code, out = build(tmp_path, config)
    assert code == 0
    written = load_file(out / "model.safetensors")
    summary = hidden_inputs if mode == "hidden_mean" else last_token_inputs
    math_mean, code_mean = summary(base, MATH), summary(base, CODE)
    unit = lambda v: v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)  # noqa: E731
    expected = [unit(math_mean - code_mean), unit(code_mean - math_mean)]
    for layer in range(2):
        gate = written[f"model.layers.{layer}.mlp.gate.weight"]
        reference = torch.stack([expected[0][layer], expected[1][layer]]).to(gate.dtype)
        if mode == "hidden":   # mergekit-moe's bfloat16 arithmetic, reproduced exactly
            assert torch.equal(gate, reference)
        else:
            assert torch.allclose(gate, reference, atol=1e-5)
    moe = load_moe(out)
    on_math, on_code = routed_fraction(moe, MATH), routed_fraction(moe, CODE)
    assert on_math[0] > on_math[1] and on_code[1] > on_code[0], (on_math, on_code)
    manifest = json.loads((out / "merge_manifest.json").read_text())
    tokens = sum(len(p.split()) + 1 for p in MATH + CODE)
    assert manifest["gates"]["prompts"][0] == {"expert": "experts[0]", "prompts": 6, "tokens": tokens}


def last_token_inputs(base: Path, prompts: list[str]) -> torch.Tensor:
    """(L, d) bfloat16, mergekit-moe's `hidden`: the bfloat16 model on one batch left-padded with BOS (id 1),
    each layer's input at the last position, averaged over the prompts in bfloat16."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    ids = {w: i for i, w in enumerate(WORDS)}
    rows = [[1] + [ids[w] for w in prompt.split()] for prompt in prompts]
    width = max(map(len, rows))
    tokens = torch.tensor([[1] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        states = torch.stack(model(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states[:-1])
    last = states[:, :, -1, :]
    return last.sum(dim=1) / last.shape[1]


def test_cheap_embed_gates_are_normalised_embedding_sums(zoo, tmp_path):
    base = zoo["llama_base"]
    config = {"base_model": str(base), "gate_mode": "cheap_embed", "experts_per_token": 1,
              "experts": [{"source_model": str(zoo["llama_ft0"]), "positive_prompts": ["w4 w5", "w6"]},
                          {"source_model": str(zoo["llama_ft1"]), "positive_prompts": ["w30"],
                           "negative_prompts": ["w4"]}]}
    code, out = build(tmp_path, config)
    assert code == 0
    embed = load_file(base / "model.safetensors")["model.embed_tokens.weight"]
    unit = lambda v: v / v.norm()  # noqa: E731
    row0 = unit(embed[[1, 4 + 4, 5 + 4, 1, 6 + 4]].sum(dim=0))
    row1 = unit(unit(embed[[1, 30 + 4]].sum(dim=0)) - unit(embed[[1, 4 + 4]].sum(dim=0)))
    written = load_file(out / "model.safetensors")
    for layer in range(2):
        assert torch.allclose(written[f"model.layers.{layer}.mlp.gate.weight"],
                              torch.stack([row0, row1]), atol=1e-6)


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_seeded_gates_and_noise_are_reproducible(zoo, tmp_path, mode):
    config = {"base_model": str(zoo["llama_base"]), "gate_mode": mode, "experts_per_token": 2,
              "experts": [{"source_model": str(zoo["llama_ft0"]), "noise_scale": 0.01},
                          {"source_model": str(zoo["llama_ft1"])}, {"source_model": str(zoo["llama_ft1"])}]}
    runs = {}
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        code, out = build(tmp_path, config, "--seed", seed, name=name)
        assert code == 0
        runs[name] = load_file(out / "model.safetensors")
    gate, fused = "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj"
    noisy = {run: tensors[fused][0, :32] for run, tensors in runs.items()}   # expert 0's gate_proj rows
    assert all(torch.equal(runs["a"][n], runs["b"][n]) for n in runs["a"])
    assert not torch.equal(runs["a"][gate], runs["c"][gate]) and not torch.equal(noisy["a"], noisy["c"])
    assert not torch.equal(runs["a"][gate], runs["a"]["model.layers.1.mlp.gate.weight"])
    gates = torch.stack([runs["a"][f"model.layers.{i}.mlp.gate.weight"] for i in range(2)])
    assert gates.shape == (2, 3, 16)
    if mode == "uniform_random":
        bound = 1 / math.sqrt(16)
        assert gates.abs().max() <= bound and gates.min() < -bound / 2 and gates.max() > bound / 2
    else:
        assert 0.8 < gates.std() < 1.2
    source = load_file(zoo["llama_ft0"] / "model.safetensors")["model.layers.0.mlp.gate_proj.weight"]
    noise = noisy["a"] - source
    assert 0.008 < noise.std() < 0.012
    assert torch.equal(runs["a"][fused][1, :32], load_file(zoo["llama_ft1"] / "model.safetensors")[
        "model.layers.0.mlp.gate_proj.weight"])


def test_output_files_manifest_card_sharding_and_generation(zoo, tmp_path):
    config = {"base_model": str(zoo["qwen2_base"]), "gate_mode": "hidden", "dtype": "float32",
              "experts": [{"source_model": str(zoo["qwen2_ft0"]), "positive_prompts": MATH},
                          {"source_model": str(zoo["qwen2_ft1"]), "positive_prompts": CODE}],
              "shared_experts": [{"source_model": str(zoo["qwen2_base"]), "positive_prompts": ["w50"]}]}
    code, out = build(tmp_path, config, "--dtype", "bfloat16", "--max_shard_size_gb", "0.00001")
    assert code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert {"model.layers.0.mlp.experts.1.down_proj.weight", "model.layers.0.mlp.shared_expert.up_proj.weight",
            "model.layers.1.mlp.gate.weight",
            "model.layers.1.mlp.shared_expert_gate.weight"} <= set(index["weight_map"])
    moe_config = json.loads((out / "config.json").read_text())
    assert moe_config["architectures"] == ["Qwen2MoeForCausalLM"] and moe_config["num_experts"] == 2
    assert moe_config["dtype"] == "bfloat16" and moe_config["moe_intermediate_size"] == 32
    assert (out / "tokenizer.json").is_file()
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["config_text"] == (tmp_path / "moe.yml").read_text()
    assert manifest["architecture"]["chosen_by"].startswith("default") and manifest["dtype"] == "bfloat16"
    assert manifest["experts"][1]["positive_prompts"] == CODE
    assert manifest["shared_experts"][0]["role"] == "shared_experts[0]"
    card = (out / "README.md").read_text()
    assert (tmp_path / "moe.yml").read_text().strip() in card and json.dumps(MATH[0]) in card
    model = load_moe(out)
    assert model.dtype == torch.bfloat16
    generated = model.generate(torch.tensor([[1, 7, 8]]), max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 9)


def test_example_configs_validate_and_hub_ids_go_to_the_card_front_matter():
    from utils.moe import LAYOUTS, MoEJob
    from utils.moe.build import model_card

    files = sorted(CONFIGS.glob("*.yml"))
    assert files
    for path in files:
        config = parse_moe_config(yaml.safe_load(path.read_text()), str(path))
        assert config.experts
    path = CONFIGS / "qwen2_5_chat_code.yml"
    config = parse_moe_config(yaml.safe_load(path.read_text()), str(path))
    card = model_card(MoEJob(config, path.read_text(), "out"), LAYOUTS[config.architecture], "out")
    assert card.startswith("---\nbase_model:\n- Qwen/Qwen2.5-0.5B-Instruct\n- Qwen/Qwen2.5-Coder-0.5B-Instruct\nlibrary_name:")
    assert "- shared expert 0: `Qwen/Qwen2.5-0.5B-Instruct`" in card and "residual_scale: 0.5" in card


def _bad(zoo, **changes):
    config = {"base_model": str(zoo["llama_base"]), "gate_mode": "hidden",
              "experts": [{"source_model": str(zoo["llama_ft0"]), "positive_prompts": MATH},
                          {"source_model": str(zoo["llama_ft1"]), "positive_prompts": CODE}]}
    config.update(changes)
    return config


@pytest.mark.parametrize("case, expected", [
    ("wide_expert", "experts[1]: tensor 'model.layers.0.mlp.down_proj.weight' has shape (16, 48)"),
    ("other_architecture", "experts[1]: "),
    ("no_experts", "experts: at least one expert"),
    ("too_many_per_token", "experts_per_token: 3 is larger than the number of experts (2)"),
    ("no_prompts", "experts[1].positive_prompts: gate_mode hidden needs"),
    ("unmappable_architecture", "architecture: qwen3_moe cannot be built from base_model"),
    ("mixtral_shared", "shared_experts: mixtral has no shared expert"),
    ("qwen2_without_shared", "shared_experts: qwen2_moe needs exactly one shared expert"),
    ("typo", "experts[0].positive_prompt: unknown key"),
    ("bad_gate_mode", "gate_mode: 'hiden' is not valid"),
    ("missing_model", "base_model: "),
])
def test_bad_inputs_exit_2_naming_the_key_and_write_nothing(zoo, tmp_path, capsys, case, expected):
    config = {
        "wide_expert": lambda: _bad(zoo, experts=[{"source_model": str(zoo["llama_ft0"]), "positive_prompts": MATH},
                                                  {"source_model": str(zoo["llama_wide"]), "positive_prompts": CODE}]),
        "other_architecture": lambda: _bad(zoo, experts=[
            {"source_model": str(zoo["llama_ft0"]), "positive_prompts": MATH},
            {"source_model": str(zoo["qwen2_ft1"]), "positive_prompts": CODE}]),
        "no_experts": lambda: _bad(zoo, experts=[]),
        "too_many_per_token": lambda: _bad(zoo, experts_per_token=3),
        "no_prompts": lambda: _bad(zoo, experts=[{"source_model": str(zoo["llama_ft0"]), "positive_prompts": MATH},
                                                 {"source_model": str(zoo["llama_ft1"])}]),
        "unmappable_architecture": lambda: _bad(zoo, architecture="qwen3_moe"),
        "mixtral_shared": lambda: _bad(zoo, architecture="mixtral", shared_experts=[
            {"source_model": str(zoo["llama_base"]), "positive_prompts": ["w50"]}]),
        "qwen2_without_shared": lambda: _bad(zoo, base_model=str(zoo["qwen2_base"]), experts=[
            {"source_model": str(zoo["qwen2_ft0"]), "positive_prompts": MATH},
            {"source_model": str(zoo["qwen2_ft1"]), "positive_prompts": CODE}]),
        "typo": lambda: _bad(zoo, experts=[{"source_model": str(zoo["llama_ft0"]), "positive_prompt": MATH}]),
        "bad_gate_mode": lambda: _bad(zoo, gate_mode="hiden"),
        "missing_model": lambda: _bad(zoo, base_model=str(tmp_path / "nowhere")),
    }[case]()
    code, out = build(tmp_path, config)
    error = capsys.readouterr().err
    assert code == 2 and expected in error and error.count("\n") == 1, error
    if case == "other_architecture":
        assert "model_type 'qwen2'" in error and "'llama'" in error
    if case == "missing_model":
        assert "nowhere: no such checkpoint folder" in error
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["moe.yml"]


def test_existing_output_is_kept_without_overwrite(zoo, tmp_path, capsys):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    config = _bad(zoo, gate_mode="random")
    code, _ = build(tmp_path, config)
    assert code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _ = build(tmp_path, config, "--overwrite")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_bad_yaml_names_the_file(tmp_path, capsys):
    path = tmp_path / "broken.yml"
    path.write_text("base_model: [unclosed\n")
    code = merge_moe.main([str(path), "--output_dir", str(tmp_path / "out")])
    assert code == 2 and f"{path}: not valid YAML (line" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_cuda_without_cuda_is_a_bad_input(zoo, tmp_path, capsys):
    code, out = build(tmp_path, _bad(zoo, gate_mode="random"), "--device", "cuda")
    assert code == 2 and "--device: device 'cuda' requested but CUDA is not available" in capsys.readouterr().err
    assert not out.exists()


def test_an_output_that_overlaps_an_input_is_refused_even_with_overwrite(zoo, tmp_path, capsys):
    import shutil

    base = shutil.copytree(zoo["llama_base"], tmp_path / "base")
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    config = _bad(zoo, gate_mode="random", base_model=str(base))
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    for target in (base, base / "moe", tmp_path):
        code = merge_moe.main([str(tmp_path / "moe.yml"), "--output_dir", str(target), "--overwrite", "--no_progress"])
        assert code == 2 and "overlaps the base_model input" in capsys.readouterr().err, target
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before and not (base / "moe").exists()


def test_architecture_and_dtype_aliases_resolve_case_insensitively():
    experts = [{"source_model": "a"}, {"source_model": "b"}]
    config = parse_moe_config({"base_model": "x", "gate_mode": "random", "experts": experts, "architecture": "Qwen",
                               "dtype": "BF16"}, "moe.yml")
    assert (config.architecture, config.dtype) == ("qwen2_moe", "bfloat16")
    config = parse_moe_config({"base_model": "x", "gate_mode": "random", "experts": experts, "architecture": "qwen3",
                               "dtype": "fp32"}, "moe.yml")
    assert (config.architecture, config.dtype) == ("qwen3_moe", "float32")


def test_an_output_below_a_file_exits_2_with_one_line(zoo, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(_bad(zoo, gate_mode="random"), sort_keys=False))
    code = merge_moe.main([str(tmp_path / "moe.yml"), "--output_dir", str(blocker / "moe"), "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and err.endswith("; nothing was written\n")
    assert err.startswith(("merge_moe.py: error: File exists: ", "merge_moe.py: error: Not a directory: "))
