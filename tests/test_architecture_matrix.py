"""The architecture coverage matrix (tests/architectures.py): every architecture × operation cell runs here
on a tiny random model built from its config class, through the entry scripts' main(argv).

A cell that works must write a model that its Auto class loads with no missing, unexpected or resized
tensor and that runs a forward pass, with tensors equal to an in-memory reference (the library's
merge_state_dicts for flag merges, the inputs' tensors for passthrough, a slerp written here for the
gradient recipe, sums of squares for the analysis, the dense MLPs for MoE experts). A refused cell must
exit 2 with its documented reason. The README's matrix must be the rendered declaration.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import analyze_task_vectors
import merge_models
import merge_moe
from model_merging_methods import DareOptions, MergeOptions
from model_merging_methods.merge import merge_state_dicts
from tests.architectures import ARCHITECTURES, BY_KEY, OPERATIONS, dummy_inputs, render_matrix, save_family
from tests.conftest import ROOT

KEYS = [a.key for a in ARCHITECTURES]


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """Base + two fine-tunes per architecture, built once per session on first use."""
    root = tmp_path_factory.mktemp("architectures")
    cache: dict[str, dict[str, Path]] = {}

    def get(key: str) -> dict[str, Path]:
        if key not in cache:
            cache[key] = save_family(BY_KEY[key], root / key)
        return cache[key]
    return get


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only add synchronisation (and contention on a shared 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run(main, argv, capsys):
    code = main(argv + ["--no_progress"])
    return code, capsys.readouterr().err


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def load_and_run(architecture, folder: Path, model_class: str | None = None):
    """The merge loads with the architecture's Auto class as `model_class` (default: the architecture's),
    every tensor in place, and runs forward."""
    import transformers

    auto = getattr(transformers, architecture.auto_class)
    model, info = auto.from_pretrained(folder, output_loading_info=True)
    assert type(model).__name__ == (model_class or architecture.model_class)
    problems = {key: value for key, value in info.items() if value and key != "error_msgs"}
    assert not problems, problems
    with torch.no_grad():
        output = model.eval()(**dummy_inputs(architecture))
    values = output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state
    assert torch.isfinite(values).all()
    return model


def refused(architecture, operation: str, code: int, err: str, out: Path) -> None:
    assert code == 2 and not out.exists(), err
    assert architecture.refused[operation].message in err, err


def layer_name(prefix: str, index: int, name: str) -> str | None:
    """`name` moved to layer `index` when it lies in the stack `prefix`, else None."""
    head = prefix + "."
    if not name.startswith(head):
        return None
    rest = name[len(head):].split(".", 1)
    return f"{head}{index}.{rest[1]}" if rest[0].isdigit() else None


@pytest.mark.parametrize("key", KEYS)
def test_flag_merges(key, families, tmp_path, capsys):
    """TIES and task arithmetic with DARE through merge_models.py equal the in-memory merge bit for bit; the
    TIES merge loads and runs."""
    architecture, folders = BY_KEY[key], families(key)
    base, models = weights(folders["base"]), [weights(folders["ft0"]), weights(folders["ft1"])]
    runs = {"ties_merging": (["--density", "0.5"], MergeOptions(density=0.5), None),
            "task_arithmetic": (["--drop_rate", "0.3", "--scaling_coefficient", "0.8"],
                                MergeOptions(scaling_coefficient=0.8), DareOptions(drop_rate=0.3))}
    for method, (flags, options, dare) in runs.items():
        out = tmp_path / method
        code, err = run(merge_models.main, ["--base_model", str(folders["base"]), "--models", str(folders["ft0"]),
                                            str(folders["ft1"]), "--method", method, "--seed", "3",
                                            "--output_dir", str(out)] + flags, capsys)
        assert code == 0, err
        reference = merge_state_dicts(method, base, models, options, dare=dare, seed=3)
        merged = weights(out)
        assert merged.keys() == base.keys()
        assert all(torch.equal(merged[name], reference[name]) for name in base), method
        assert any(not torch.equal(merged[name], base[name]) for name in base)
        fates = json.loads((out / "merge_manifest.json").read_text())["tensor_fates"]
        assert fates["counts"] == {"merged": 3 * len(base), "copied": 0, "renumbered": 0, "dropped": 0}
    load_and_run(architecture, tmp_path / "ties_merging")


@pytest.mark.parametrize("key", KEYS)
def test_passthrough_slices(key, families, tmp_path, capsys):
    """base layers [0, 2) then ft0's layer 1: three layers, renumbered, loading as the same class."""
    architecture, folders = BY_KEY[key], families(key)
    recipe = tmp_path / "slices.yml"
    recipe.write_text(f"slices:\n  - sources:\n      - model: {folders['base']}\n        layer_range: [0, 2]\n"
                      f"  - sources:\n      - model: {folders['ft0']}\n        layer_range: [1, 2]\n"
                      f"merge_method: passthrough\n")
    out = tmp_path / "out"
    code, err = run(merge_models.main, ["--config", str(recipe), "--output_dir", str(out)], capsys)
    if "slices" in architecture.refused:
        return refused(architecture, "slices", code, err, out)
    assert code == 0, err
    base, ft0, merged = weights(folders["base"]), weights(folders["ft0"]), weights(out)
    expected_names = set(base) | {layer_name(architecture.layers, 2, n) for n in ft0
                                  if layer_name(architecture.layers, 1, n) == n}
    assert set(merged) == expected_names
    for name, tensor in merged.items():
        if layer_name(architecture.layers, 2, name) == name:
            assert torch.equal(tensor, ft0[layer_name(architecture.layers, 1, name)]), name
        elif layer_name(architecture.layers, 0, name) is not None:
            assert torch.equal(tensor, base[name]), name
        else:   # embeddings and other modules from the first slice's model, final norm and head from the last's
            assert torch.equal(tensor, base[name]) or torch.equal(tensor, ft0[name]), name
    fates = json.loads((out / "merge_manifest.json").read_text())["tensor_fates"]
    assert fates["counts"]["renumbered"] >= 1 and sum(fates["counts"].values()) == len(base) + len(ft0)
    config = json.loads((out / "config.json").read_text())
    text = next((config[k] for k in ("text_config",) if isinstance(config.get(k), dict)), config)
    source = json.loads((folders["base"] / "config.json").read_text())
    source = next((source[k] for k in ("text_config",) if isinstance(source.get(k), dict)), source)
    assert 3 in [text.get(k) for k in ("num_hidden_layers", "n_layer", "num_layers")] or "layers_block_type" in text
    for key in ("layer_types", "layers_block_type"):   # per-layer kinds follow the layers they come from
        if isinstance(source.get(key), list):
            assert text[key] == [source[key][0], source[key][1], source[key][1]], key
    model = load_and_run(architecture, out)
    assert model.config.get_text_config().num_hidden_layers == 3


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's slerp: on the normalised copies' angle; linear when they are nearly colinear."""
    a64, b64 = a.double(), b.double()
    na, nb = a64 / (a64.norm() if a64.norm() > eps else 1), b64 / (b64.norm() if b64.norm() > eps else 1)
    dot = float((na * nb).sum())
    if abs(dot) > 0.9995:
        return ((1 - t) * a64 + t * b64).to(a.dtype)
    theta = math.acos(dot)
    return ((math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)).to(a.dtype)


@pytest.mark.parametrize("key", KEYS)
def test_slerp_gradient(key, families, tmp_path, capsys):
    """slerp of base and ft0 with t = [0.2, 0.8] over the layers: layer 0 at 0.2, layer 1 at 0.8, tensors
    outside the layers at 0.2 (t = 0 of the gradient)."""
    architecture, folders = BY_KEY[key], families(key)
    recipe = tmp_path / "slerp.yml"
    recipe.write_text(f"slices:\n  - sources:\n      - model: {folders['base']}\n        layer_range: [0, 2]\n"
                      f"      - model: {folders['ft0']}\n        layer_range: [0, 2]\nmerge_method: slerp\n"
                      f"base_model: {folders['base']}\nparameters:\n  t: [0.2, 0.8]\n")
    out = tmp_path / "out"
    code, err = run(merge_models.main, ["--config", str(recipe), "--output_dir", str(out)], capsys)
    if "gradient" in architecture.refused:
        return refused(architecture, "gradient", code, err, out)
    assert code == 0, err
    base, ft0, merged = weights(folders["base"]), weights(folders["ft0"]), weights(out)
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        t = 0.8 if layer_name(architecture.layers, 1, name) == name else 0.2
        if tensor.is_floating_point():
            assert torch.allclose(tensor, slerp(base[name], ft0[name], t), rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("key", KEYS)
def test_task_vector_analysis(key, families, tmp_path, capsys):
    """The analysis finds the declared layer stacks from names and config, and ‖δ‖₂ equals the in-memory one."""
    architecture, folders = BY_KEY[key], families(key)
    out = tmp_path / "analysis"
    code, err = run(analyze_task_vectors.main, ["--base_model", str(folders["base"]), "--models",
                                                str(folders["ft0"]), str(folders["ft1"]), "--output_dir", str(out),
                                                "--no_figures"], capsys)
    assert code == 0, err
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["grouping"]["stacks"] == architecture.stacks
    assert not analysis["grouping"]["warnings"]
    base = weights(folders["base"])
    for model, folder in zip(analysis["models"], (folders["ft0"], folders["ft1"])):
        other = weights(folder)
        l2 = math.sqrt(sum(float((other[n].double() - base[n].double()).pow(2).sum())
                           for n in base if base[n].is_floating_point()))
        assert model["global"]["l2"] == pytest.approx(l2, rel=1e-5)


@pytest.mark.parametrize("key", KEYS)
def test_moe_build(key, families, tmp_path, capsys):
    """A MoE of ft0 and ft1 (a shared expert ft0 for Qwen2-MoE) on the base: where mergekit-moe's families
    allow, the experts are the dense MLPs and the model loads and runs; elsewhere exit 2 with the reason."""
    from utils.moe.layouts import LAYOUTS, default_architecture

    architecture, folders = BY_KEY[key], families(key)
    model_type = json.loads((folders["base"] / "config.json").read_text())["model_type"]
    shared = model_type == "qwen2"
    config = tmp_path / "moe.yml"
    config.write_text(f"base_model: {folders['base']}\ngate_mode: random\nexperts_per_token: 1\nexperts:\n"
                      f"  - source_model: {folders['ft0']}\n  - source_model: {folders['ft1']}\n"
                      + (f"shared_experts:\n  - source_model: {folders['ft0']}\n" if shared else ""))
    out = tmp_path / "moe"
    code, err = run(merge_moe.main, [str(config), "--output_dir", str(out)], capsys)
    if "moe" in architecture.refused:
        return refused(architecture, "moe", code, err, out)
    assert code == 0, err
    layout = LAYOUTS[default_architecture(model_type, int(shared))]
    merged, base = weights(out), weights(folders["base"])
    for index, source in enumerate(("ft0", "ft1")):
        dense = weights(folders[source])
        for layer in range(2):
            prefix = f"model.layers.{layer}."
            mlp = {p: dense[f"{prefix}mlp.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")}
            if layout.fused:   # transformers 5's layout: (E, 2I, d) gate then up, and (E, d, I)
                assert torch.equal(merged[layout.fused_name(prefix, "gate_proj")][index],
                                   torch.cat([mlp["gate_proj"], mlp["up_proj"]]))
                assert torch.equal(merged[layout.fused_name(prefix, "down_proj")][index], mlp["down_proj"])
                continue
            for projection, tensor in mlp.items():
                name = layout.expert_name(prefix, index, projection)
                assert torch.equal(merged[name], tensor), name
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    load_and_run(architecture, out, layout.model_class)


@pytest.mark.parametrize("key", [a.key for a in ARCHITECTURES if a.multimodal])
def test_language_part_only(key, families, tmp_path, capsys):
    """--merge_part language: the vision tower and projector are copied from the base (never dropped), the
    language model merged, by the flag engine (task arithmetic) and a recipe (task_arithmetic) alike."""
    architecture, folders = BY_KEY[key], families(key)
    base, models = weights(folders["base"]), [weights(folders["ft0"]), weights(folders["ft1"])]
    outside = {n for n in base if n.startswith(architecture.other_modules)}
    assert outside and outside != set(base)
    reference = merge_state_dicts("task_arithmetic", base, models, MergeOptions())
    recipe = tmp_path / "ta.yml"
    recipe.write_text(f"models:\n  - model: {folders['ft0']}\n  - model: {folders['ft1']}\nmerge_method: "
                      f"task_arithmetic\nbase_model: {folders['base']}\nparameters:\n  weight: 1.0\n")
    runs = {"flags": ["--base_model", str(folders["base"]), "--models", str(folders["ft0"]), str(folders["ft1"]),
                      "--method", "task_arithmetic"],
            "recipe": ["--config", str(recipe)]}
    for label, argv in runs.items():
        out = tmp_path / label
        code, err = run(merge_models.main, argv + ["--merge_part", "language", "--output_dir", str(out)], capsys)
        assert code == 0, err
        merged = weights(out)
        assert merged.keys() == base.keys()
        for name in base:
            if name in outside:
                assert torch.equal(merged[name], base[name]), (label, name)
            else:
                assert torch.allclose(merged[name], reference[name], atol=1e-6), (label, name)
        fates = json.loads((out / "merge_manifest.json").read_text())["tensor_fates"]
        assert fates["counts"]["copied"] == len(outside) and fates["counts"]["dropped"] == 2 * len(outside), label
    assert any(not torch.equal(reference[name], base[name]) for name in outside)   # "all" would change them


def test_readme_holds_the_matrix():
    """The documented matrix (docs/architectures.md, linked from the README) is the declaration rendered (a cell
    changes in tests/architectures.py only)."""
    readme = (ROOT / "docs" / "architectures.md").read_text()
    assert render_matrix() in readme
    assert len(OPERATIONS) == 5 and len(ARCHITECTURES) >= 21


def test_the_language_stack_wins_over_an_equally_deep_vision_tower(tmp_path):
    """Slices count the language model's layers even when the vision tower has as many blocks (and more
    tensors): the stack nearest the input embedding is the language model's; the tower is another module."""
    from utils.recipes.architecture import infer_layout, other_module_prefixes

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "text_config": {
        "num_hidden_layers": 2}, "vision_config": {"depth": 2}}))
    names = ([f"visual.blocks.{i}.{part}" for i in range(2) for part in ("attn.qkv.weight", "attn.proj.weight",
                                                                         "mlp.fc1.weight", "mlp.fc2.weight")]
             + ["visual.patch_embed.proj.weight", "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
             + [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)])
    layout = infer_layout(tmp_path, names, "model")
    assert (layout.prefix, layout.layer_key, layout.num_layers) == ("model.layers", "text_config.num_hidden_layers", 2)
    assert layout.language_root == "model" and layout.other_stacks == {"visual.blocks": 2}
    assert sorted(layout.other_modules) == sorted(n for n in names if n.startswith("visual."))
    assert set(layout.other_modules) <= set(layout.pre) and layout.input_embedding == "model.embed_tokens.weight"
    assert other_module_prefixes(layout) == ["visual."]
