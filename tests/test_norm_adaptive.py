"""norm_adaptive: weights from task-vector norms (the toolkit's published example, closed forms, zero norms),
the merge itself, and its command line (norms computed in a first pass, read from analysis.json, or typed)."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_merging_methods.norm_adaptive import norm_adaptive_weights
from model_merging_methods.options import MergeError

PUBLISHED_NORMS = [182.63, 31.87, 0.0, 0.529, 9.26]
PUBLISHED_WEIGHTS = [0.0052, 0.1485, 0.3021, 0.2986, 0.2457]


def test_published_example_in_exp_mode():
    weights = norm_adaptive_weights(PUBLISHED_NORMS, "exp", beta=1.0)
    assert weights == pytest.approx(PUBLISHED_WEIGHTS, abs=5e-5)
    # the formula: w_i = exp(−β L_i / mean L) / Σ_j exp(−β L_j / mean L), the mean over all five norms
    mean = sum(PUBLISHED_NORMS) / 5
    raw = [math.exp(-n / mean) for n in PUBLISHED_NORMS]
    assert weights == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)
    assert weights[2] == pytest.approx(1 / sum(raw))   # the zero-norm model keeps exp(0) = 1


def test_linear_and_power_closed_forms():
    assert norm_adaptive_weights([1.0, 2.0, 4.0], "linear") == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    raw = [1.0, 2.0 ** -1.5, 4.0 ** -1.5]
    assert norm_adaptive_weights([1.0, 2.0, 4.0], "power") == pytest.approx([r / sum(raw) for r in raw])
    assert norm_adaptive_weights([1.0, 2.0, 4.0], "power", alpha=2.0) == pytest.approx([16 / 21, 4 / 21, 1 / 21])
    assert norm_adaptive_weights([3.0, 3.0], "exp", beta=7.0) == pytest.approx([0.5, 0.5])
    # huge norms neither overflow nor underflow (softmax of log-weights)
    assert norm_adaptive_weights([1e-300, 1e300], "linear") == pytest.approx([1.0, 0.0])
    assert sum(norm_adaptive_weights([1e6, 1.0, 3.0], "exp", beta=50.0)) == pytest.approx(1.0)


def test_zero_norms():
    # linear / power: a zero-norm model gets weight 0 and the others are normalised among themselves
    assert norm_adaptive_weights([0.0, 1.0, 3.0], "linear") == pytest.approx([0.0, 0.75, 0.25])
    assert norm_adaptive_weights([0.0, 2.0], "power") == [0.0, 1.0]
    # exp: exp(0) = 1 → the zero model keeps a share (mean over both norms = 1)
    assert norm_adaptive_weights([0.0, 2.0], "exp") == pytest.approx([1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))])
    for mode in ("linear", "power", "exp"):
        with pytest.raises(MergeError, match="every task vector has L2 norm 0"):
            norm_adaptive_weights([0.0, 0.0], mode)
    with pytest.raises(MergeError, match="model 1 is nan"):
        norm_adaptive_weights([1.0, float("nan")], "exp")
    with pytest.raises(MergeError, match="model 0 is -1.0"):
        norm_adaptive_weights([-1.0, 2.0], "linear")
    with pytest.raises(MergeError, match="unknown norm mode 'cubic'"):
        norm_adaptive_weights([1.0], "cubic")


# ---- the merge ------------------------------------------------------------------------------------------

def _family():
    torch.manual_seed(0)
    base = {"w": torch.randn(4, 3), "b": torch.randn(3), "step": torch.tensor(7)}
    deltas = [{"w": torch.randn(4, 3) * s, "b": torch.randn(3) * s} for s in (0.1, 1.0)]
    models = [{**{n: base[n] + d[n] for n in d}, "step": torch.tensor(7)} for d in deltas]
    return base, models, deltas


@pytest.mark.parametrize("mode", ["linear", "power", "exp"])
def test_merge_is_task_arithmetic_with_norm_weights(mode):
    from model_merging_methods import MergeOptions, merge_state_dicts

    base, models, deltas = _family()
    norms = [math.sqrt(sum(float(d[n].double().square().sum()) for n in d)) for d in deltas]
    merged = merge_state_dicts("norm_adaptive", base, models, MergeOptions(norm_mode=mode, scaling_coefficient=0.8))
    weights = norm_adaptive_weights(norms, mode)
    for name in ("w", "b"):
        expected = base[name] + 0.8 * (weights[0] * deltas[0][name] + weights[1] * deltas[1][name])
        assert torch.allclose(merged[name], expected, atol=1e-6), name
    assert torch.equal(merged["step"], base["step"])
    assert weights[0] > weights[1]          # the smaller task vector weighs more
    given = merge_state_dicts("norm_adaptive", base, models, MergeOptions(norm_mode=mode, scaling_coefficient=0.8,
                                                                          norms=norms))
    assert all(torch.equal(given[n], merged[n]) for n in merged)


def test_zero_task_vector_in_the_merge():
    from model_merging_methods import MergeOptions, merge_state_dicts

    base, models, deltas = _family()
    unchanged = {n: t.clone() for n, t in base.items()}
    # linear: the zero model gets weight 0, so the merge is the one without it
    with_zero = merge_state_dicts("norm_adaptive", base, [models[0], unchanged, models[1]], MergeOptions(norm_mode="linear"))
    without = merge_state_dicts("norm_adaptive", base, models, MergeOptions(norm_mode="linear"))
    assert all(torch.allclose(with_zero[n], without[n], atol=1e-7) for n in ("w", "b"))
    # exp: the zero model keeps weight exp(0)/Σ, which scales the others' share down
    norms = [math.sqrt(sum(float(d[n].double().square().sum()) for n in d)) for d in deltas]
    weights = norm_adaptive_weights([norms[0], 0.0, norms[1]], "exp")
    merged = merge_state_dicts("norm_adaptive", base, [models[0], unchanged, models[1]], MergeOptions(norm_mode="exp"))
    expected = base["w"] + weights[0] * deltas[0]["w"] + weights[2] * deltas[1]["w"]
    assert torch.allclose(merged["w"], expected, atol=1e-6) and weights[1] > 0
    with pytest.raises(MergeError, match="every task vector has L2 norm 0"):
        merge_state_dicts("norm_adaptive", base, [unchanged, unchanged], MergeOptions())
    with pytest.raises(MergeError, match="got 1 norms for 2 models"):
        merge_state_dicts("norm_adaptive", base, models, MergeOptions(norms=[1.0]))
    with pytest.raises(MergeError, match="norm -2.0 of model 1"):
        merge_state_dicts("norm_adaptive", base, models, MergeOptions(norms=[1.0, -2.0]))


# ---- merge_models.py --------------------------------------------------------------------------------------

def _merge(args, capsys=None):
    import merge_models

    code = merge_models.main(args + ["--no_progress"])
    return code, (capsys.readouterr().err if capsys else "")


def _load(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_cli_norms_computed_read_from_analysis_or_given_agree(llama_family, tmp_path):
    import analyze_task_vectors
    from model_merging_methods import MergeOptions, merge_state_dicts
    from utils.engine.reader import CheckpointReader

    def weights(folder):
        reader = CheckpointReader(folder)
        return {name: reader.get(name) for name in reader.names()}

    base, ft0, ft1 = (str(llama_family[k]) for k in ("base", "ft0", "ft1"))
    common = ["--base_model", base, "--models", ft0, ft1, "--method", "norm_adaptive", "--norm_mode", "power",
              "--norm_alpha", "2", "--scaling_coefficient", "1.5"]
    assert _merge([*common, "--output_dir", str(tmp_path / "computed")])[0] == 0
    analysis_dir = tmp_path / "analysis"
    assert analyze_task_vectors.main(["--base_model", base, "--models", ft0, ft1, "--output_dir", str(analysis_dir),
                                      "--no_figures", "--no_progress"]) == 0
    assert _merge([*common, "--output_dir", str(tmp_path / "from_file"), "--norms_from",
                   str(analysis_dir / "analysis.json")])[0] == 0
    computed = json.loads((tmp_path / "computed" / "merge_manifest.json").read_text())["norm_adaptive"]
    from_file = json.loads((tmp_path / "from_file" / "merge_manifest.json").read_text())["norm_adaptive"]
    analysis = json.loads((analysis_dir / "analysis.json").read_text())
    assert from_file["norms"] == [m["global"]["l2"] for m in analysis["models"]]
    assert computed["norms"] == pytest.approx(from_file["norms"], rel=1e-6)
    assert computed["source"].startswith("computed") and from_file["source"].startswith("read from")
    assert computed["weights"] == pytest.approx(norm_adaptive_weights(computed["norms"], "power", alpha=2.0))
    expected = merge_state_dicts("norm_adaptive", weights(llama_family["base"]),
                                 [weights(llama_family["ft0"]), weights(llama_family["ft1"])],
                                 MergeOptions(norm_mode="power", norm_alpha=2.0, scaling_coefficient=1.5))
    merged, read = _load(tmp_path / "computed"), _load(tmp_path / "from_file")
    for name in expected:
        assert torch.equal(merged[name], expected[name]), name
        assert torch.allclose(read[name], expected[name], atol=1e-6), name
    assert _merge([*common, "--output_dir", str(tmp_path / "given"), "--norms", "1", "3"])[0] == 0
    given = json.loads((tmp_path / "given" / "merge_manifest.json").read_text())["norm_adaptive"]
    assert given["weights"] == pytest.approx([0.9, 0.1]) and given["source"] == "given"


def test_cli_bad_norm_inputs(llama_family, tmp_path, capsys):
    import analyze_task_vectors

    base, ft0, ft1 = (str(llama_family[k]) for k in ("base", "ft0", "ft1"))
    analysis_dir = tmp_path / "analysis"
    assert analyze_task_vectors.main(["--base_model", base, "--models", ft0, "--output_dir", str(analysis_dir),
                                      "--no_figures", "--no_progress"]) == 0
    common = ["--base_model", base, "--models", ft0, ft1, "--method", "norm_adaptive"]
    code, err = _merge([*common, "--output_dir", str(tmp_path / "o1"), "--norms_from", str(analysis_dir)], capsys)
    assert code == 2 and "does not list model" in err and ft1 in err
    code, err = _merge([*common, "--output_dir", str(tmp_path / "o2"), "--norms", "1"], capsys)
    assert code == 2 and "got 1 values for 2 models" in err
    code, err = _merge([*common, "--output_dir", str(tmp_path / "o3"), "--norms", "0", "0"], capsys)
    assert code == 2 and "every task vector has L2 norm 0" in err
    code, err = _merge([*common, "--output_dir", str(tmp_path / "o4"), "--norms_from", str(tmp_path / "none.json")],
                       capsys)
    assert code == 2 and "none.json" in err
    code, err = _merge(["--base_model", base, "--models", ft0, "--method", "task_arithmetic", "--output_dir",
                        str(tmp_path / "o5"), "--norms", "1"], capsys)
    assert code == 2 and "norm_adaptive" in err
    code, err = _merge(["--base_model", base, "--models", base, base, "--method", "norm_adaptive",
                        "--output_dir", str(tmp_path / "o6")], capsys)
    assert code == 2 and "every task vector has L2 norm 0" in err
    broken = tmp_path / "broken"
    shutil.copytree(ft1, broken)
    state = load_file(broken / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"][1, 2] = float("inf")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    code, err = _merge(["--base_model", base, "--models", ft0, str(broken), "--method", "norm_adaptive",
                        "--output_dir", str(tmp_path / "o7")], capsys)
    assert code == 2 and "model 1" in err and "model.layers.0.mlp.up_proj.weight" in err and "not finite" in err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))
