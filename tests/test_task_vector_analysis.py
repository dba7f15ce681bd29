"""analyze_task_vectors.py and utils/analysis: closed-form statistics, exact quantiles beyond 2^24 elements,
layer/kind grouping of Llama, BERT and GPT-2, cosine invariants, outputs and bad inputs."""
import csv
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import analyze_task_vectors
from tests.conftest import save_family
from utils.analysis import LayerGrouping, exact_quantiles, kind_of, tensor_statistics
from utils.analysis.grouping import NO_LAYER

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(args, capsys=None):
    code = analyze_task_vectors.main([*args, "--no_progress"])
    return code, (capsys.readouterr().err if capsys else "")


def _copy_with(source, target, change):
    """A copy of checkpoint folder `source` whose weights are change(state)."""
    shutil.copytree(source, target)
    state = load_file(target / "model.safetensors")
    save_file(change(state), target / "model.safetensors", metadata={"format": "pt"})
    return target


def _deltas(base, model):
    b, m = load_file(base / "model.safetensors"), load_file(model / "model.safetensors")
    return {n: m[n].double() - b[n].double() for n in b}


# ---- statistics -------------------------------------------------------------------------------------------

def test_tensor_statistics_closed_form():
    delta = torch.tensor([0.0, 0.0, 0.0, 4.0])
    stats = tensor_statistics(delta, torch.ones(4), [0.0, 0.5, 0.9, 1.0], 1e-6)
    # mean 1, deviations (−1, −1, −1, 3): m2 = 3, m3 = 6, m4 = 21
    assert stats["numel"] == 4 and stats["l2"] == 4.0 and stats["l1"] == 4.0 and stats["max_abs"] == 4.0
    assert stats["mean"] == 1.0
    assert stats["std"] == pytest.approx(2.0)                       # sqrt(12 / 3), sample std
    assert stats["skewness"] == pytest.approx(6 / 3 ** 1.5)
    assert stats["excess_kurtosis"] == pytest.approx(21 / 9 - 3)
    assert stats["zero_fraction"] == 0.75 and stats["unchanged_fraction"] == 0.75
    assert stats["base_l2"] == 2.0 and stats["relative_l2"] == 2.0
    # sorted |δ| = 0, 0, 0, 4: h = 3q; q = 0.9 → x(2) + 0.7·(x(3) − x(2)) = 2.8
    assert stats["quantiles"] == {"q0": 0.0, "q0.5": 0.0, "q0.9": pytest.approx(2.8), "q1": 4.0}


def test_histogram_bins_are_quarter_powers_of_two():
    from utils.analysis.statistics import Histogram

    histogram = Histogram()
    histogram.add(torch.tensor([0.0, 1.0, 1.1, 1.3, 2.0, 0.0, 1e-3]))
    result = histogram.to_json()
    assert result["exact_zeros"] == 2
    assert result["bins"][1:] == [[1.0, 1.25, 2], [1.25, 1.5, 1], [2.0, 2.5, 1]]
    assert result["bins"][0][0] <= 1e-3 < result["bins"][0][1] and result["bins"][0][2] == 1


def test_unchanged_fraction_is_relative_to_the_base_and_constant_tensors_have_no_shape_moments():
    delta = torch.tensor([1e-7, 1e-3, 0.0, 1.0])
    stats = tensor_statistics(delta, torch.tensor([1.0, 1e4, 0.0, 1.0]), [0.5], 1e-6)
    assert stats["unchanged_fraction"] == 0.75     # 1e-7 ≤ 1e-6·1, 1e-3 ≤ 1e-6·1e4, exact zero; not 1 vs 1e-6
    constant = tensor_statistics(torch.full((5,), 0.25), torch.ones(5), [0.5], 1e-6)
    assert constant["std"] == 0.0 and constant["skewness"] is None and constant["excess_kurtosis"] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_quantiles_match_torch_quantile_on_small_tensors(dtype):
    values = torch.rand(1001, generator=torch.Generator().manual_seed(0), dtype=dtype)
    values[::7] = 0.25  # ties
    qs = [0.0, 0.1, 0.333, 0.5, 0.9, 0.999, 1.0]
    assert exact_quantiles(values, qs) == pytest.approx(torch.quantile(values, torch.tensor(qs, dtype=dtype)).tolist(),
                                                        rel=0, abs=1e-12)


def test_exact_quantiles_beyond_two_to_the_24_elements():
    n = 2 ** 24 + 1                                 # values 0 .. 2^24, all exact in float32
    values = torch.arange(n, dtype=torch.float32)
    with pytest.raises(RuntimeError):
        torch.quantile(values, 0.5)                 # the limit the analysis must not inherit
    # h = (n − 1)·q = 2^24·q
    assert exact_quantiles(values, [0.0, 0.25, 0.5, 0.99, 1.0]) == pytest.approx(
        [0.0, 2.0 ** 22, 2.0 ** 23, 0.99 * 2 ** 24, 2.0 ** 24], rel=0, abs=1e-6)


# ---- grouping -------------------------------------------------------------------------------------------

def test_kind_rules_on_common_architectures():
    expected = {
        "model.layers.0.self_attn.q_proj.weight": "attention", "model.layers.3.mlp.down_proj.weight": "mlp",
        "model.layers.0.input_layernorm.weight": "norm", "model.layers.0.post_attention_layernorm.weight": "norm",
        "model.embed_tokens.weight": "embedding", "lm_head.weight": "head", "model.norm.weight": "norm",
        "encoder.layer.1.attention.output.dense.weight": "attention",
        "encoder.layer.1.attention.output.LayerNorm.bias": "norm", "encoder.layer.1.intermediate.dense.weight": "mlp",
        "encoder.layer.1.output.dense.weight": "mlp", "embeddings.word_embeddings.weight": "embedding",
        "pooler.dense.weight": "head", "classifier.weight": "head",
        "transformer.h.0.attn.c_attn.weight": "attention", "transformer.h.0.attn.c_proj.weight": "attention",
        "transformer.h.0.mlp.c_proj.weight": "mlp", "transformer.h.0.ln_1.weight": "norm",
        "transformer.wte.weight": "embedding", "transformer.ln_f.bias": "norm",
        "transformer.blocks.2.ffn.up_proj.weight": "mlp", "gpt_neox.embed_out.weight": "head",
        "encoder.block.0.layer.1.DenseReluDense.wi.weight": "mlp", "something.else": "other",
    }
    assert {name: kind_of(name) for name in expected} == expected


def test_layer_stacks_from_names_and_config():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)] + ["model.embed_tokens.weight",
                                                                           "classifier.0.weight", "classifier.1.weight"]
    grouping = LayerGrouping.from_names(names, {"num_hidden_layers": 4})
    assert grouping.stacks == {"model.layers": 4} and not grouping.warnings   # classifier.N has 2 ≠ 4 entries
    assert grouping.layer_of("model.layers.3.mlp.up_proj.weight") == "3"
    assert grouping.layer_of("classifier.1.weight") == NO_LAYER
    assert grouping.layer_order() == ["0", "1", "2", "3", NO_LAYER]
    t5 = [f"{side}.block.{i}.layer.0.SelfAttention.q.weight" for side in ("encoder", "decoder") for i in range(3)]
    grouping = LayerGrouping.from_names(t5, {"num_layers": 3, "num_decoder_layers": 3})
    assert grouping.stacks == {"encoder.block": 3, "decoder.block": 3}
    assert grouping.layer_of("decoder.block.2.layer.0.SelfAttention.q.weight") == "decoder.block.2"
    guessed = LayerGrouping.from_names(t5, None)
    assert guessed.stacks == {"encoder.block": 3, "decoder.block": 3} and guessed.warnings


@pytest.fixture(scope="module")
def gpt2_family(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=3, n_head=2))
    return save_family(model, root, ["base", "ft0"])


@pytest.mark.parametrize("family, stack, layers, expected_kinds", [
    ("llama_family", "model.layers", 2, {"embedding", "attention", "mlp", "norm", "head"}),
    ("bert_family", "encoder.layer", 2, {"embedding", "attention", "mlp", "norm", "head"}),
    ("gpt2_family", "transformer.h", 3, {"embedding", "attention", "mlp", "norm"}),
])
def test_grouping_on_real_architectures(request, tmp_path, family, stack, layers, expected_kinds):
    folders = request.getfixturevalue(family)
    out = tmp_path / "out"
    assert _run(["--base_model", str(folders["base"]), "--models", str(folders["ft0"]), "--output_dir", str(out),
                 "--no_figures"])[0] == 0
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["grouping"]["stacks"] == {stack: layers} and not analysis["grouping"]["warnings"]
    assert analysis["grouping"]["layers"] == [str(i) for i in range(layers)] + [NO_LAYER]
    model = analysis["models"][0]
    assert set(model["per_kind"]) == expected_kinds
    for layer in map(str, range(layers)):  # every layer holds attention, MLP and norms
        assert {"attention", "mlp", "norm"} <= set(model["per_layer"][layer])
    # aggregation: L2 in quadrature, L1 summed, against the tensors and an in-memory computation
    deltas = _deltas(folders["base"], folders["ft0"])
    tensors = model["tensors"]
    for layer, kinds in model["per_layer"].items():
        members = [s for s in tensors.values() if s["layer"] == layer]
        assert kinds["all"]["l2"] == pytest.approx(math.sqrt(sum(s["l2"] ** 2 for s in members)))
        assert kinds["all"]["l1"] == pytest.approx(sum(s["l1"] for s in members))
    floats = {n: d for n, d in deltas.items() if d.numel() and n in tensors}
    assert set(floats) == set(tensors)
    assert model["global"]["l2"] == pytest.approx(math.sqrt(sum(float(d.square().sum()) for d in floats.values())),
                                                 rel=1e-5)
    assert model["global"]["numel"] == sum(d.numel() for d in floats.values())


# ---- pairwise -------------------------------------------------------------------------------------------

def test_cosine_with_itself_is_one_and_with_its_negation_minus_one(llama_family, tmp_path):
    base = load_file(llama_family["base"] / "model.safetensors")
    same = _copy_with(llama_family["ft0"], tmp_path / "same", lambda s: s)
    negated = _copy_with(llama_family["ft0"], tmp_path / "negated", lambda s: {n: 2 * base[n] - t for n, t in s.items()})
    out = tmp_path / "out"
    assert _run(["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]), str(same),
                 str(negated), str(llama_family["ft1"]), "--output_dir", str(out), "--dtype", "float64",
                 "--no_figures"])[0] == 0
    analysis = json.loads((out / "analysis.json").read_text())
    pairs = {(p["a"], p["b"]): p for p in analysis["pairwise"]}
    assert len(pairs) == 6
    assert pairs[("ft0", "same")]["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert pairs[("ft0", "same")]["sign_agreement"] == 1.0
    assert pairs[("ft0", "negated")]["cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert pairs[("ft0", "negated")]["sign_agreement"] == 0.0
    for layer, values in pairs[("ft0", "negated")]["per_layer"].items():
        assert values["cosine"] == pytest.approx(-1.0, abs=1e-6), layer
    # an unrelated fine-tune: the cosine of the in-memory task vectors
    a, b = _deltas(llama_family["base"], llama_family["ft0"]), _deltas(llama_family["base"], llama_family["ft1"])
    dot = sum(float((a[n] * b[n]).sum()) for n in a)
    expected = dot / math.sqrt(sum(float(t.square().sum()) for t in a.values()) *
                               sum(float(t.square().sum()) for t in b.values()))
    assert pairs[("ft0", "ft1")]["cosine"] == pytest.approx(expected, rel=1e-9)
    agree = sum(int((torch.sign(a[n]) * torch.sign(b[n]) > 0).sum()) for n in a)
    both = sum(int(((a[n] != 0) & (b[n] != 0)).sum()) for n in a)
    assert pairs[("ft0", "ft1")]["sign_agreement"] == pytest.approx(agree / both)


# ---- outputs --------------------------------------------------------------------------------------------

def test_outputs_tables_summaries_report_and_figures(llama_family, tmp_path, capsys):
    out = tmp_path / "out"
    code, _ = _run(["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]),
                    str(llama_family["ft1"]), "--output_dir", str(out), "--top_k", "3", "--quantiles", "0.5", "0.99",
                    "--exclude_param_names_regex", "lm_head.*"], capsys)
    assert code == 0
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["skipped_tensors"] == {"lm_head.weight": "excluded"}
    assert analysis["base"]["files"][0]["header_sha256"] and analysis["versions"]["torch"]
    figures = analysis["figures"]
    assert set(figures) == {"layer_l2", "layer_kind", "cosine", "layer_cosine", "histogram"}
    for path in figures.values():
        data = (out / path).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 2000
        assert f"]({path})" in (out / "report.md").read_text()
    for label in ("ft0", "ft1"):
        summary = json.loads((out / label / "summary.json").read_text())
        assert len(summary["top_tensors_by_l2"]) == 3
        assert summary["global"] == next(m for m in analysis["models"] if m["label"] == label)["global"]
        l2s = [row["l2"] for row in summary["top_tensors_by_l2"]]
        assert l2s == sorted(l2s, reverse=True) and l2s[0] == max(s["l2"] for s in
                                                                  analysis["models"][0 if label == "ft0" else 1]
                                                                  ["tensors"].values())
    with open(out / "tensors.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * analysis["num_tensors"] and {"abs_q0.5", "abs_q0.99", "excess_kurtosis"} <= set(rows[0])
    with open(out / "pairwise.csv") as handle:
        pairwise = list(csv.DictReader(handle))
    assert pairwise[0]["scope"] == "global" and float(pairwise[0]["cosine"]) == pytest.approx(
        analysis["pairwise"][0]["cosine"])
    histogram = analysis["models"][0]["histogram"]
    assert sum(b[2] for b in histogram["bins"]) + histogram["exact_zeros"] == analysis["models"][0]["global"]["numel"]
    assert all(b[0] < b[1] <= c[0] for b, c in zip(histogram["bins"], histogram["bins"][1:]))
    assert histogram["bins"][-1][0] <= analysis["models"][0]["global"]["max_abs"] < histogram["bins"][-1][1]
    assert not list(tmp_path.glob(".out.partial-*"))


# ---- bad input ------------------------------------------------------------------------------------------

def _drop_tensor(state):
    state.pop("model.layers.1.mlp.up_proj.weight")
    return state


def _reshape_tensor(state):
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:-1].clone()
    return state


def _nan_tensor(state):
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    return state


@pytest.mark.parametrize("change, message", [
    (_drop_tensor, "tensor 'model.layers.1.mlp.up_proj.weight' of the base"),
    (_reshape_tensor, "shape mismatch for tensor 'model.layers.1.mlp.up_proj.weight'"),
    (_nan_tensor, "task vector of model broken"),
])
def test_bad_models_exit_2_naming_the_tensor(llama_family, tmp_path, capsys, change, message):
    broken = _copy_with(llama_family["ft0"], tmp_path / "broken", change)
    code, err = _run(["--base_model", str(llama_family["base"]), "--models", str(broken), "--output_dir",
                      str(tmp_path / "out"), "--no_figures"], capsys)
    assert code == 2 and message in err and "model.layers.1.mlp.up_proj.weight" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_existing_output_missing_model_and_bad_quantile(llama_family, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = ["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]), "--no_figures"]
    code, err = _run([*args, "--output_dir", str(out)], capsys)
    assert code == 2 and str(out) in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "user data"
    assert _run([*args, "--output_dir", str(out), "--overwrite"])[0] == 0
    assert (out / "analysis.json").exists() and not (out / "keep.txt").exists()
    code, err = _run(["--base_model", str(llama_family["base"]), "--models", str(tmp_path / "nowhere"),
                      "--output_dir", str(tmp_path / "o2")], capsys)
    assert code == 2 and "nowhere" in err
    code, err = _run([*args, "--output_dir", str(tmp_path / "o3"), "--quantiles", "1.5"], capsys)
    assert code == 2 and "quantile 1.5" in err


def test_task_model_wrapping_the_backbone_is_aligned_by_prefix(bert_family, tmp_path, capsys):
    """A classifier checkpoint (names under ``bert.`` plus a head) against the bare pretrained encoder."""
    def wrap(state):
        wrapped = {f"bert.{n}": t for n, t in state.items()}
        wrapped["classifier.weight"] = torch.ones(2, 16)
        return wrapped

    wrapped = _copy_with(bert_family["ft0"], tmp_path / "wrapped", wrap)
    args = ["--base_model", str(bert_family["base"]), "--no_figures"]
    code, err = _run([*args, "--models", str(wrapped), "--output_dir", str(tmp_path / "o1")], capsys)
    assert code == 2 and "'classifier.weight'" in err and "--exclude_param_names_regex" in err
    assert _run([*args, "--models", str(wrapped), "--exclude_param_names_regex", "classifier.*",
                 "--output_dir", str(tmp_path / "o2")])[0] == 0
    assert _run([*args, "--models", str(bert_family["ft0"]), "--output_dir", str(tmp_path / "o3")])[0] == 0
    aligned = json.loads((tmp_path / "o2" / "analysis.json").read_text())
    plain = json.loads((tmp_path / "o3" / "analysis.json").read_text())
    assert aligned["model_name_prefix"] == "bert." and plain["model_name_prefix"] == ""
    assert aligned["models"][0]["global"] == plain["models"][0]["global"]
    assert aligned["grouping"]["stacks"] == {"encoder.layer": 2}


def test_an_output_below_a_file_exits_2_with_one_line(llama_family, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = _run(["--base_model", str(llama_family["base"]), "--models", str(llama_family["ft0"]), "--no_figures",
                      "--output_dir", str(blocker / "analysis")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.endswith("; nothing was written\n")
    assert err.startswith(("analyze_task_vectors.py: error: File exists: ",
                           "analyze_task_vectors.py: error: Not a directory: "))


def test_worker_threads_do_not_change_any_figure(llama_family, tmp_path):
    """Tensors are analysed on worker threads and accumulated in tensor order: 1 or 3 threads, the same JSON."""
    from utils.analysis.analyze import AnalysisOptions, analyze

    results = []
    for threads in (1, 3):
        options = AnalysisOptions(base_model=str(llama_family["base"]),
                                  models=[str(llama_family["ft0"]), str(llama_family["ft1"])],
                                  output_dir=str(tmp_path / f"out{threads}"), threads=threads)
        analysis = analyze(options)
        for key in ("created", "wall_seconds"):
            analysis.pop(key)
        analysis.pop("options")
        results.append(json.dumps(analysis, sort_keys=True))
    assert results[0] == results[1]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_task_vector_is_refused_without_a_separate_pass(bad):
    from utils.analysis.statistics import NonFiniteDelta

    delta = torch.zeros(1000)
    delta[637] = bad
    with pytest.raises(NonFiniteDelta):
        tensor_statistics(delta, torch.ones(1000), [0.5], 1e-6)


def test_histogram_from_the_radix_counts_equals_the_direct_one():
    """The float32 path fills the |δ| histogram from the quantiles' bincount of bits >> 16: same bins."""
    from utils.analysis.statistics import Histogram

    generator = torch.Generator().manual_seed(3)
    delta = torch.randn(50_000, generator=generator) * torch.logspace(-8, 1, 50_000)
    delta[::7] = 0.0
    direct, fused = Histogram(), Histogram()
    direct.add(delta.abs())
    stats = tensor_statistics(delta, torch.ones_like(delta), [0.1, 0.5, 0.99], 1e-6, fused)
    assert fused.to_json() == direct.to_json() and fused.zeros == len(range(0, 50_000, 7))
    assert list(stats["quantiles"].values()) == pytest.approx(
        torch.quantile(delta.abs().double(), torch.tensor([0.1, 0.5, 0.99], dtype=torch.float64)).tolist(), rel=1e-6)
