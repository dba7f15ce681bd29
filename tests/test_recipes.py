"""Recipes end to end: every example in configs/recipes/ on tiny random Llamas (loaded and made to generate),
parameter resolution, layer assembly, tokenizer merging, multi-document recipes, and every bad input."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import merge_models
from model_merging_methods.recipe_methods import RecipeParameter, gta_tensor, sparsify_magnitude
from tests.conftest import ROOT
from tests.recipe_helpers import build_models, cwd, workspace  # noqa: F401 (fixtures)
from utils.recipes.parameters import evaluate_setting, resolve

RECIPES = ROOT / "configs" / "recipes"


def run(args, capsys=None):
    code = merge_models.main(args + ["--no_progress"])
    err = capsys.readouterr().err if capsys else ""
    return code, err


def weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def generate(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("w5 w6 w7", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    return model


def slerp64(a, b, t):
    """Spherical interpolation in float64 with the whole tensor as one vector (an independent reference)."""
    a, b = a.double(), b.double()
    theta = torch.acos((a * b).sum() / (a.norm() * b.norm()))
    return ((torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)).float()


# ---------------------------------------------------------------------------------------------- examples


def filled(recipe: str, layers: int = 2) -> str:
    """An example with its layer-count placeholders (N, N/2) filled in for `layers`-layer models, in the cwd."""
    text = (RECIPES / recipe).read_text().replace("N/2]", f"{layers // 2}]").replace("[N/2,", f"[{layers // 2},")
    return write(Path(recipe), text.replace(", N]", f", {layers}]"))


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yml") if p.name != "two-stage.yml"))
def test_every_example_recipe_merges_loads_and_generates(cwd, recipe):
    code, _ = run(["--config", filled(recipe), "--output_dir", "out"])
    assert code == 0
    model = generate("out")
    assert (cwd / "out" / "README.md").read_text().count((RECIPES / recipe).read_text().splitlines()[-1]) >= 1
    manifest = json.loads((cwd / "out" / "merge_manifest.json").read_text())
    assert manifest["method"]["semantics"] == "mergekit 0.1.5" and manifest["versions"]["torch"] == torch.__version__
    assert model.config.num_hidden_layers == manifest["output"]["num_layers"]


def test_slerp_gradients_per_module_and_t0_outside_the_layers(cwd):
    assert run(["--config", str(RECIPES / "slerp-gradients.yml"), "--output_dir", "out"])[0] == 0
    out, base, chat = weights("out"), weights("models/base"), weights("models/chat")
    bf = lambda t: t.bfloat16()  # noqa: E731
    # two layers: t = 0 then 1. attention [0, ..., 1]: base then chat; mlp [1, ..., 0]: chat then base
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], bf(base["model.layers.0.self_attn.q_proj.weight"]))
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], bf(chat["model.layers.1.self_attn.q_proj.weight"]))
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], bf(chat["model.layers.0.mlp.up_proj.weight"]))
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], bf(base["model.layers.1.mlp.up_proj.weight"]))
    # no filter matches the norms / lm_head: the fallback 0.5; great-circle interpolation (float64 here)
    expected = slerp64(bf(base["lm_head.weight"]), bf(chat["lm_head.weight"]), 0.5)
    assert not torch.allclose(expected, 0.5 * base["lm_head.weight"] + 0.5 * chat["lm_head.weight"], atol=1e-3)
    assert torch.allclose(out["lm_head.weight"].float(), expected, atol=1e-3, rtol=1e-2)


def test_ties_example_matches_the_formula(cwd):
    assert run(["--config", str(RECIPES / "ties.yml"), "--output_dir", "out"])[0] == 0
    card = (cwd / "out" / "README.md").read_text()
    assert "**TIES** (`ties`, mergekit semantics)" in card and "arXiv 2306.01708" in card
    assert "- models/base (base)" in card and "- models/code" in card and (RECIPES / "ties.yml").read_text() in card
    assert 'AutoModelForCausalLM.from_pretrained("out")' in card
    assert (cwd / "out" / "mergekit_config.yml").read_text() == (RECIPES / "ties.yml").read_text()
    out, base, chat, code = weights("out"), weights("models/base"), weights("models/chat"), weights("models/code")
    name = "model.layers.1.mlp.down_proj.weight"
    b, x, y = (m[name].bfloat16() for m in (base, chat, code))
    expected = gta_tensor(b, [x, y], [0.6, 0.4], lambda i, d: sparsify_magnitude(d, [0.5, 0.7][i]), consensus=True,
                          normalize=True)
    assert torch.equal(out[name], expected)
    # independent check of the election on the kept entries (float32 arithmetic, bf16 tolerance)
    dx, dy = (sparsify_magnitude(x - b, 0.5).float() * 0.6, sparsify_magnitude(y - b, 0.7).float() * 0.4)
    sign = torch.where(dx + dy >= 0, 1.0, -1.0)
    mx, my = (dx.sign() == sign).float(), (dy.sign() == sign).float()
    div = (0.6 * mx + 0.4 * my)
    mixed = (mx * dx + my * dy) / torch.where(div == 0, 1.0, div)
    assert torch.allclose(out[name].float(), b.float() + mixed, atol=2e-2)


def test_dare_ties_masks_follow_the_seed(cwd):
    recipe = str(RECIPES / "dare-ties.yml")
    assert run(["--config", recipe, "--output_dir", "a", "--seed", "1"])[0] == 0
    assert run(["--config", recipe, "--output_dir", "b", "--seed", "1"])[0] == 0
    assert run(["--config", recipe, "--output_dir", "c", "--seed", "2"])[0] == 0
    a, b, c = weights("a"), weights("b"), weights("c")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_example_layer_ranges_are_refused_until_filled_in(cwd, capsys):
    """Issue 26 item 3: an example written for some depth cannot silently truncate another model."""
    code, err = run(["--config", str(RECIPES / "passthrough-depth-up.yml"), "--output_dir", "out"], capsys)
    assert code == 2 and not (cwd / "out").exists()
    assert "slices[0].sources[0].layer_range: [0, 'N'] holds the placeholder 'N': write layer numbers of models/chat" in err
    assert len(err.strip().splitlines()) == 1


def test_a_slice_plan_that_drops_layers_warns_with_the_counts(cwd, capsys):
    recipe = write(cwd / "top.yml", "slices:\n  - sources:\n      - model: models/chat\n        layer_range: [1, 2]\n"
                                    "merge_method: passthrough\ndtype: float32\n")
    code, err = run(["--config", recipe, "--output_dir", "out"], capsys)
    assert code == 0
    assert "warning: model models/chat has 2 layers; the output (1 layers) takes 1 of them: layers 0 are dropped" in err
    code, err = run(["--config", filled("passthrough-depth-up.yml"), "--output_dir", "deep"], capsys)
    assert code == 0 and "models/chat has" not in err       # every layer of chat is taken
    assert "warning: model models/code has 2 layers; the output (3 layers) takes 1 of them: layers 0 are dropped" in err


def test_passthrough_stacks_and_renumbers_layers(cwd):
    assert run(["--config", filled("passthrough-depth-up.yml"), "--output_dir", "out"])[0] == 0
    out, chat, code = weights("out"), weights("models/chat"), weights("models/code")
    config = json.loads((cwd / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["dtype"] == "bfloat16"
    assert torch.equal(out["model.layers.1.self_attn.k_proj.weight"], chat["model.layers.1.self_attn.k_proj.weight"].bfloat16())
    assert torch.equal(out["model.layers.2.self_attn.k_proj.weight"], code["model.layers.1.self_attn.k_proj.weight"].bfloat16())
    assert torch.equal(out["model.embed_tokens.weight"], chat["model.embed_tokens.weight"].bfloat16())
    assert torch.equal(out["model.norm.weight"], code["model.norm.weight"].bfloat16())
    assert "model.layers.3.self_attn.k_proj.weight" not in out


def test_tokenizer_union_with_forced_token_source_and_padding(cwd):
    from transformers import AutoTokenizer

    assert run(["--config", str(RECIPES / "tokenizer-union.yml"), "--output_dir", "out"])[0] == 0
    out, base, chatml = weights("out"), weights("models/base"), weights("models/chatml")
    tokenizer = AutoTokenizer.from_pretrained(cwd / "out")
    assert len(tokenizer) == 66 and "<|im_start|>" in tokenizer.chat_template
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    embed = out["model.embed_tokens.weight"]
    assert embed.shape == (72, 16)                                       # 66 padded to a multiple of 8
    assert json.loads((cwd / "out" / "config.json").read_text())["vocab_size"] == 72
    # forced: every input's row of the new token is chatml's, so the linear merge reproduces it
    assert torch.allclose(embed[start], chatml["model.embed_tokens.weight"][64])
    assert torch.allclose(embed[5], 0.5 * base["model.embed_tokens.weight"][5] + 0.5 * chatml["model.embed_tokens.weight"][5])
    assert torch.allclose(embed[66:], embed[:66].mean(dim=0).expand(6, 16), atol=1e-6)


def test_tokenizer_union_fills_missing_rows_from_the_only_model_that_has_them(cwd):
    recipe = write(cwd / "r.yml", "models:\n  - model: models/base\n  - model: models/chatml\n    parameters: {weight: 1.0}\n"
                   "merge_method: task_arithmetic\nbase_model: models/base\ntokenizer_source: union\n")
    assert run(["--config", recipe, "--output_dir", "out"])[0] == 0
    out, chatml = weights("out"), weights("models/chatml")
    # the base lacks <|im_end|>: its row is chatml's, so δ = 0 there and the merge keeps chatml's row
    assert torch.equal(out["lm_head.weight"][65], chatml["lm_head.weight"][65])
    assert torch.equal(out["lm_head.weight"][:64], chatml["lm_head.weight"][:64])


def test_two_stage_recipe_uses_and_reuses_the_intermediate(cwd, capsys):
    args = ["--config", str(RECIPES / "two-stage.yml"), "--output_dir", "final", "--intermediate_dir", "inter"]
    assert run(args)[0] == 0
    base, chat, code = weights("models/base"), weights("models/chat"), weights("models/code")
    stage, final = weights("inter/chat-slerp"), weights("final")
    name = "model.layers.0.mlp.gate_proj.weight"
    assert torch.allclose(stage[name], slerp64(base[name], chat[name], 0.5), atol=1e-6)
    expected = base[name] + 0.7 * (stage[name] - base[name]) + 0.3 * (code[name] - base[name])
    assert torch.allclose(final[name], expected, atol=1e-6)
    before = (cwd / "inter" / "chat-slerp" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert run(args + ["--overwrite"])[0] == 0
    assert "reusing" in capsys.readouterr().out
    assert (cwd / "inter" / "chat-slerp" / "model.safetensors").stat().st_mtime_ns == before
    changed = write(cwd / "changed.yml", (RECIPES / "two-stage.yml").read_text().replace("t: 0.5", "t: 0.25"))
    code, err = run(["--config", changed, "--output_dir", "final2", "--intermediate_dir", "inter"], capsys)
    assert code == 2 and "holds another recipe" in err and not (cwd / "final2").exists()


def test_tied_gpt2_stacking_finds_its_layers_without_a_list(cwd):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(cwd / "gpt2")
    recipe = write(cwd / "r.yml", "slices:\n  - sources: [{model: gpt2, layer_range: [0, 2]}]\n"
                   "  - sources: [{model: gpt2, layer_range: [0, 2]}]\nmerge_method: passthrough\n")
    assert run(["--config", recipe, "--output_dir", "out"])[0] == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cwd / "out")
    assert model.config.n_layer == 4 and "lm_head.weight" not in weights("out")
    assert torch.equal(weights("out")["transformer.h.3.mlp.c_fc.weight"], weights("gpt2")["transformer.h.1.mlp.c_fc.weight"])
    assert model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, do_sample=False).shape == (1, 4)


# ---------------------------------------------------------------------------------------------- parameters


def test_gradients_filters_and_precedence():
    weight = RecipeParameter("weight", float, "input")
    assert evaluate_setting([0, 1], "x", 0.25, weight, "w") == 0.25
    assert evaluate_setting([0, 0.5, 1.5], "x", 0.75, weight, "w") == 1.0           # 0.5 + 0.5·(1.5 − 0.5)
    flag = RecipeParameter("normalize", bool)
    assert evaluate_setting([True, False], "x", 0.9, flag, "n") is True              # non-numeric: pick int(t·(n−1))
    conditional = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.3}, {"value": 0.9}]
    assert evaluate_setting(conditional, "model.layers.3.self_attn.q_proj.weight", 0.5, weight, "w") == 0.5
    assert evaluate_setting(conditional, "model.layers.3.mlp.up_proj.weight", 0.5, weight, "w") == 0.3
    assert evaluate_setting(conditional, "model.norm.weight", 0.5, weight, "w") == 0.9
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "model.norm.weight", 0.5, weight, "w") is None
    scopes = [("source", {"weight": [{"filter": "mlp", "value": 1}]}), ("slice", {"weight": 2}), ("top", {"weight": 3})]
    assert resolve(weight, scopes, tensor_name="a.mlp.b", t=0) == 1.0
    assert resolve(weight, scopes, tensor_name="a.attn.b", t=0) == 2.0               # unmatched filter: next scope
    assert resolve(RecipeParameter("density", float, "non_base", 1.0), scopes, tensor_name="x", t=0) == 1.0


def test_embeddings_and_lm_head_take_the_gradient_at_t0(cwd):
    recipe = write(cwd / "r.yml", "models:\n  - model: models/base\n  - model: models/chat\n    parameters:\n"
                   "      weight: [0.0, 1.0]\nmerge_method: task_arithmetic\nbase_model: models/base\n")
    assert run(["--config", recipe, "--output_dir", "out"])[0] == 0
    out, base, chat = weights("out"), weights("models/base"), weights("models/chat")
    assert torch.equal(out["lm_head.weight"], base["lm_head.weight"])                # t = 0 → weight 0
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert torch.allclose(out["model.layers.1.mlp.up_proj.weight"], chat["model.layers.1.mlp.up_proj.weight"])


# ---------------------------------------------------------------------------------------------- bad input

TIES = "merge_method: ties\nbase_model: models/base\n"
BAD = {
    "yaml": ("models:\n  - model: models/base\n   bad: [1, 2\n", "line 3, column"),
    "unknown key": ("merge_method: linear\nmodels:\n  - model: models/base\n    weigth: 1\n", "models[0]: unknown key 'weigth'"),
    "unknown method": ("merge_method: frankenslerp\nmodels:\n  - model: models/base\n", "unknown merge_method 'frankenslerp'"),
    "missing weight": (TIES + "models:\n  - model: models/base\n  - model: models/chat\n",
                       "missing required parameter 'weight' for model 'models/chat', tensor 'model.embed_tokens.weight'"),
    "slice lengths": ("merge_method: slerp\nbase_model: models/base\nslices:\n  - sources:\n"
                      "      - {model: models/base, layer_range: [0, 2]}\n      - {model: models/chat, layer_range: [0, 1]}\n",
                      "slices[0]: every source of a slice must span the same number of layers"),
    "layer range": ("merge_method: passthrough\nslices:\n  - sources: [{model: models/chat, layer_range: [0, 3]}]\n",
                    "slices[0].sources[0].layer_range: [0, 3] goes beyond the 2 layers of models/chat"),
    "no such model": ("merge_method: linear\nmodels:\n  - model: ./models/nothing-here\n    parameters: {weight: 1}\n",
                      "models/nothing-here"),
    "unreachable hub id": ("merge_method: linear\nmodels:\n  - model: some-org/no-such-model\n    parameters: {weight: 1}\n",
                           "fetching it from the Hugging Face hub failed"),
    "tokenizer source": ("merge_method: linear\nmodels:\n  - model: models/base\n    parameters: {weight: 1}\n"
                         "tokenizer_source: models/elsewhere\n", "tokenizer source 'models/elsewhere' is not one of"),
    "filter type": (TIES + "models:\n  - model: models/base\n  - model: models/chat\n    parameters:\n"
                    "      weight: [{filter: 3, value: 1}]\n", "models[1].parameters.weight[0].filter: must be a string"),
    "models and slices": ("merge_method: passthrough\nmodels: [{model: models/base}]\n"
                          "slices:\n  - sources: [{model: models/chat, layer_range: [0, 1]}]\n", "exactly one of 'models' or 'slices'"),
    "value type": (TIES + "models:\n  - model: models/base\n  - model: models/chat\n    parameters: {weight: heavy}\n",
                   "parameter 'weight' must be a float, got 'heavy'"),
    "base not a source": ("merge_method: ties\nbase_model: models/base\nslices:\n  - sources:\n"
                          "      - {model: models/chat, layer_range: [0, 2], parameters: {weight: 1}}\n",
                          "slices[0]: base_model 'models/base' must be one of this slice's sources"),
    "cycle": ("name: a\nmerge_method: linear\nmodels: [{model: b, parameters: {weight: 1}}]\n---\n"
              "name: b\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n", "cycle: a -> b -> a"),
    "name twice": ("name: a\nmerge_method: linear\nmodels: [{model: models/base, parameters: {weight: 1}}]\n---\n"
                   "name: a\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n",
                   "name: 'a' is already used by document 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_exit_2_with_a_message_and_no_output(cwd, capsys, case):
    text, message = BAD[case]
    recipe = write(cwd / "bad.yml", text)
    code, err = run(["--config", recipe, "--output_dir", "out", "--intermediate_dir", "inter"], capsys)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not (cwd / "out").exists() and not (cwd / "inter").exists()
    assert len(err.strip().splitlines()) == 1


def test_recipe_and_method_flags_together_is_an_error(cwd, capsys):
    with pytest.raises(SystemExit) as exit_info:
        merge_models.main(["--config", str(RECIPES / "ties.yml"), "--method", "ties", "--output_dir", "out"])
    assert exit_info.value.code == 2
    assert "remove --method" in capsys.readouterr().err
    assert not (cwd / "out").exists()


def test_existing_output_is_not_replaced_without_overwrite(cwd, capsys):
    (cwd / "out").mkdir()
    (cwd / "out" / "keep.txt").write_text("mine")
    code, err = run(["--config", str(RECIPES / "ties.yml"), "--output_dir", "out"], capsys)
    assert code == 2 and "already exists" in err
    assert (cwd / "out" / "keep.txt").read_text() == "mine"


def test_an_output_that_overlaps_an_input_is_refused_even_with_overwrite(cwd, capsys, tmp_path):
    import shutil

    shutil.copytree(cwd / "models", tmp_path / "own", symlinks=False)     # real folders this test may lose
    recipe = write(cwd / "r.yml", (RECIPES / "ties.yml").read_text().replace("models/", "own/"))
    before = {p: p.read_bytes() for p in (tmp_path / "own" / "base").iterdir()}
    for target in ("own/base", "own/base/merged", "own"):
        code, err = run(["--config", recipe, "--output_dir", target, "--overwrite"], capsys)
        assert code == 2 and "overlaps the input model" in err and "--output_dir" in err, target
    assert {p: p.read_bytes() for p in (tmp_path / "own" / "base").iterdir()} == before
    assert not (tmp_path / "own" / "base" / "merged").exists()


def test_example_recipes_parse_with_the_schema(cwd):
    from utils.recipes.schema import load_recipe_file

    for path in RECIPES.glob("*.yml"):
        recipes, texts = load_recipe_file(filled(path.name))   # layer-count placeholders filled in
        assert len(recipes) == len(texts) == len(list(yaml.safe_load_all(path.read_text())))
        assert all(recipe.merge_method in texts[i] for i, recipe in enumerate(recipes))


def test_elementwise_merges_streamed_in_pieces_equal_whole_tensor_merges(cwd, monkeypatch):
    import model_merging_methods.recipe_methods as recipe_methods
    import utils.engine.streaming as executor

    # slerp reduces its norms and dot over 2^20-element chunks (mergekit's); here 100, so that the
    # 100-element pieces below are whole chunks, as 2^20-element pieces are in real runs
    monkeypatch.setattr(recipe_methods, "CHUNK", 100)
    for recipe in ("tokenizer-union.yml", "passthrough-depth-up.yml", "slerp-gradients.yml"):
        assert run(["--config", filled(recipe), "--output_dir", f"whole-{recipe}"])[0] == 0
    recipe = write(cwd / "ta.yml", "models:\n  - model: models/base\n  - model: models/chat\n    parameters: {weight: 0.6}\n"
                   "  - model: models/code\n    parameters: {weight: 0.5}\nmerge_method: task_arithmetic\n"
                   "base_model: models/base\ndtype: bfloat16\n")
    assert run(["--config", recipe, "--output_dir", "whole-ta"])[0] == 0
    monkeypatch.setattr(executor, "PIECE", 100)       # every 16×32 projection now goes in 6 pieces
    for name in ("tokenizer-union.yml", "passthrough-depth-up.yml", "slerp-gradients.yml", "ta.yml"):
        source = filled(name) if name != "ta.yml" else recipe
        assert run(["--config", source, "--output_dir", f"pieces-{name}"])[0] == 0
        whole = weights(f"whole-{name}" if name != "ta.yml" else "whole-ta")
        pieces = weights(f"pieces-{name}")
        assert whole.keys() == pieces.keys() and all(torch.equal(whole[n], pieces[n]) for n in whole)


SPARSIFYING = {
    "ties": "merge_method: ties\nparameters: {normalize: true}\n",
    "ties-rescale": "merge_method: ties\nparameters: {rescale: true, lambda: 0.9}\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nparameters: {gamma: 0.05}\n",
    "breadcrumbs": "merge_method: breadcrumbs\nparameters: {gamma: 0.2, rescale: true}\n",
    "dare_ties": "merge_method: dare_ties\n",                                # L1 rescale (the default)
    "dare_linear": "merge_method: dare_linear\nparameters: {rescale: false}\n",  # draws only: elementwise
    "ties-union": "merge_method: ties\ntokenizer_source: union\n",   # embeddings permuted once, then streamed
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_sparsifying_merges_streamed_in_pieces_equal_whole_tensor_merges(cwd, monkeypatch, dtype):
    """ties / breadcrumbs* / dare_* stream large tensors in pieces with whole-tensor statistics (rank cuts
    with ties in flat order, --tie_order index; L1 rescale factors): bit-identical to merging whole tensors, and the pieces
    really were used (the run reads pieces and the statistics passes ran)."""
    import threading

    import utils.engine.statistics as statistics
    import utils.engine.streaming as executor
    import utils.recipes.job as recipe_job

    models = ("  - model: models/base\n  - model: models/chat\n    parameters: {weight: 0.6, density: 0.4}\n"
              "  - model: models/code\n    parameters: {weight: 0.5, density: 0.7}\n")
    recipes = {label: write(cwd / f"{label}.yml", f"models:\n{models}base_model: models/base\ndtype: {dtype}\n{text}")
               for label, text in SPARSIFYING.items()}
    for label, recipe in recipes.items():
        assert run(["--config", recipe, "--output_dir", f"whole-{label}", "--tie_order", "index"])[0] == 0
    prepared, permuted_in = [], []
    original = statistics.prepare
    monkeypatch.setattr(executor, "prepare", lambda *a, **k: prepared.append(a[0].name) or original(*a, **k))
    permute = recipe_job.permute_rows
    monkeypatch.setattr(recipe_job, "permute_rows",
                        lambda *a: permuted_in.append(threading.current_thread().name) or permute(*a))
    monkeypatch.setattr(executor, "PIECE", 100)       # every 16×32 projection now goes in 6 pieces
    for label, recipe in recipes.items():
        assert run(["--config", recipe, "--output_dir", f"pieces-{label}", "--threads", "3", "--tie_order", "index"])[0] == 0
        whole, pieces = weights(f"whole-{label}"), weights(f"pieces-{label}")
        assert whole.keys() == pieces.keys()
        assert [n for n in whole if not torch.equal(whole[n], pieces[n])] == [], label
    # every method but dare_linear without rescale (its draws depend on position only) needed statistics
    assert set(prepared) == {"ties", "breadcrumbs_ties", "breadcrumbs", "dare_ties"}
    # the union's embedding and lm_head were permuted once each, up front, and then streamed
    assert permuted_in == [threading.main_thread().name] * 2
    # dare_ties' L1 pass keeps each piece's keep mask (bit-packed) for the merge pass: in pieces every DARE
    # mask is drawn once, as for whole tensors
    from model_merging_methods.randomness import RandomSlot

    below, drawn = RandomSlot.below, {}
    for label, piece in (("whole", 10**9), ("pieces", 100)):
        counts: list[int] = []
        monkeypatch.setattr(executor, "PIECE", piece)
        monkeypatch.setattr(RandomSlot, "below", lambda self, count, bound, counts=counts:
                            counts.append(count) or below(self, count, bound))
        assert run(["--config", recipes["dare_ties"], "--output_dir", f"once-{label}", "--threads", "3"])[0] == 0
        drawn[label] = sum(counts)
    assert drawn["pieces"] == drawn["whole"] > 0
    assert weights("once-pieces").keys() == weights("once-whole").keys()
    assert all(torch.equal(weights("once-pieces")[n], weights("once-whole")[n]) for n in weights("once-whole"))



def test_magnitude_cut_keeps_ties_in_flat_order_and_argsort_is_mergekits_cpu_order():
    from model_merging_methods.recipe_methods import sparsify_outliers

    delta = torch.tensor([1.0, -1.0, 1.0, 0.5, -1.0, 0.25])
    # k = int(0.5·6) = 3: all three... of the four |δ| = 1 entries, the first three in flat order
    assert torch.equal(sparsify_magnitude(delta, 0.5, tie_order="index"), torch.tensor([1.0, -1.0, 1.0, 0.0, 0.0, 0.0]))
    # k = 2 of 4 ties, rescaled by Σ|δ| / Σ|kept| = 4.75 / 2
    assert torch.equal(sparsify_magnitude(delta, 0.34, rescale=True, tie_order="index"),
                       torch.tensor([1.0, -1.0, 0, 0, 0, 0]) * 2.375)
    # Breadcrumbs ascending window: keep = 3, top = 1, bottom = 2 → positions 2..4 of the stable sort
    # (0.25, 0.5 | 1, -1, 1 | -1): the first three |δ| = 1 entries
    assert torch.equal(sparsify_outliers(delta, 0.5, 0.2, tie_order="index"), torch.tensor([1.0, -1.0, 1.0, 0.0, 0.0, 0.0]))
    # on a large bfloat16 delta (many ties): the count is exact; "argsort" (the default, mergekit's call) is
    # torch.argsort's own choice
    generator = torch.Generator().manual_seed(0)
    big = (torch.randn(20000, generator=generator) * 1e-3).bfloat16()
    stable, argsort = sparsify_magnitude(big, 0.3, tie_order="index"), sparsify_magnitude(big, 0.3)
    assert int((stable != 0).sum()) == int((argsort != 0).sum()) == 6000
    order = torch.argsort(big.abs().float(), descending=True, stable=True)[:6000]
    assert torch.equal(stable, torch.zeros_like(big).index_copy(0, order, big[order]))
    reference = torch.zeros_like(big)
    reference[torch.argsort(big.abs().float(), descending=True)[:6000]] = 1
    assert torch.equal(argsort, big * reference)
    # the two differ only at entries equal to the cut-off magnitude
    cutoff = big.abs().float()[order[-1]]
    assert bool((stable != argsort).any())   # the orders do differ here, so the default is not the flat order
    assert bool((big.abs().float()[stable != argsort] == cutoff).all())


def _bpe_tokenizer(folder, extra=()):
    """A small BPE tokenizer saved as transformers does (tokenizer.json) plus its slow-format files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(["w3 w4 w5 w33 w44 w345 w53 w43"] * 20,
                                trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra)})
    tokenizer.save_pretrained(folder)
    backend.model.save(str(folder))                       # vocab.json + merges.txt


def test_union_keeps_the_sources_slow_tokenizer_files_valid(tmp_path, monkeypatch):
    """transformers 5 saves tokenizer.json only; inputs with slow-format files (vocab.json / merges.txt)
    get them in the output too, and they still describe its vocabulary (union only adds tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer

    from tests.conftest import save_tiny_llama

    monkeypatch.chdir(tmp_path)
    base = save_tiny_llama(tmp_path / "base", seed=0)
    _bpe_tokenizer(base)
    other = save_tiny_llama(tmp_path / "other", seed=1, base=base)
    _bpe_tokenizer(other, extra=["<tool>"])
    recipe = write(tmp_path / "r.yml", "merge_method: linear\nmodels:\n  - {model: base, parameters: {weight: 1}}\n"
                   "  - {model: other, parameters: {weight: 1}}\ntokenizer_source: union\n")
    assert run(["--config", recipe, "--output_dir", "out"])[0] == 0
    out = tmp_path / "out"
    assert (out / "vocab.json").read_text() == (base / "vocab.json").read_text()
    assert (out / "merges.txt").read_text() == (base / "merges.txt").read_text()
    merged = AutoTokenizer.from_pretrained(out)
    assert "<tool>" in merged.get_vocab() and "<tool>" not in json.loads((base / "vocab.json").read_text())
    # slow loaders find the tokens added on top of vocab.json in added_tokens.json
    assert json.loads((out / "added_tokens.json").read_text()) == {"<tool>": merged.convert_tokens_to_ids("<tool>")}
    slow = Tokenizer(models.BPE.from_file(str(out / "vocab.json"), str(out / "merges.txt"), unk_token="<unk>"))
    slow.pre_tokenizer = pre_tokenizers.Whitespace()
    text = "w345 w53 w4"
    assert slow.encode(text).ids == merged(text, add_special_tokens=False).input_ids


def test_argsort_cuts_rescale_with_mergekits_own_sums():
    """The default (argsort) rank cuts rescale by mergekit's L1 factor to the bit: Σ|δ| / Σ|δ ⊙ m| summed by
    torch in the tensor's dtype (float32 here, one thread as in the executors), mergekit's
    rescaled_masked_tensor written out; the streaming "index" cut sums in float64 and can differ in the
    factor's last bit (it does for seeds 2–4 of this fixture)."""
    from model_merging_methods.recipe_methods import sparsify_magnitude, sparsify_outliers

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        differs = 0
        for seed in range(5):
            delta = torch.randn(100_000, generator=torch.Generator().manual_seed(seed)) * 1e-3
            mask = torch.zeros(100_000)
            mask[torch.argsort(delta.abs(), descending=True)[:30_000]] = 1
            masked = delta * mask
            assert torch.equal(sparsify_magnitude(delta, 0.3, rescale=True),
                               masked * (delta.abs().sum() / masked.abs().sum()))
            differs += not torch.equal(sparsify_magnitude(delta, 0.3, rescale=True, tie_order="index"),
                                       masked * (delta.abs().sum() / masked.abs().sum()))
            # breadcrumbs: ascending positions [bottom, bottom + keep), keep = 30000, top = 5000
            window = torch.zeros(100_000)
            window[torch.sort(delta.abs()).indices[65_000:95_000]] = 1
            kept = delta * window
            assert torch.equal(sparsify_outliers(delta, 0.3, 0.05, rescale=True),
                               kept * (delta.abs().sum() / kept.abs().sum()))
        assert differs >= 1
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("kind, gamma", [("magnitude", 0.0), ("outliers", 0.1)])
def test_rank_mask_from_argsort_ranks_equals_the_argsort_mask(kind, gamma):
    """The in-memory search's form of mergekit's argsort cut (each entry's position in torch's order, one
    comparison per density) keeps exactly the entries of the scatter form, ties included."""
    from model_merging_methods.recipe_methods import RankCut

    generator = torch.Generator().manual_seed(3)
    delta = torch.randint(-4, 5, (37, 11), generator=generator).to(torch.bfloat16) / 8   # many ties
    for density in (0.05, 0.3, 0.5, 0.77, 0.99):
        cut = RankCut(kind, density, gamma) if kind == "outliers" else RankCut(kind, density)
        ranks = cut.argsort_ranks(delta)
        assert ranks.dtype == torch.int32 and sorted(ranks.tolist()) == list(range(delta.numel()))
        expected = cut.argsort_mask(delta, cut.argsort_order(delta))
        assert torch.equal(cut.rank_mask(delta, ranks), expected), density
        assert 0 < int(expected.sum()) < delta.numel()
