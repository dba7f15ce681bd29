"""The data-free frontier methods (TSV-M, Iso-C, Iso-CTS, CART, WUDI, consensus, LiNeS, PCB): closed forms,
invariants and float64 references of the papers' / authors' formulas on tiny tensors."""
import math

import pytest
import torch

from model_merging_methods.consensus import consensus_tensor, multi_task_vector, tall_masks
from model_merging_methods.frontier import merge_tensor, resolve_parameters
from model_merging_methods.lines import lines_scale
from model_merging_methods.options import MergeError
from model_merging_methods.pcb import pcb_tensor
from model_merging_methods.subspace import (cart_rank, cart_tensor, iso_c_tensor, iso_cts_split, iso_cts_tensor,
                                            tsv_merge_tensor)
from model_merging_methods.wudi import wudi_tensor

D = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_tsv_on_disjoint_blocks_is_the_sum_of_truncations():
    # task t lives in its own rows and columns: the kept singular vectors are already orthogonal across tasks,
    # so TSV-M = Σ_t (rank-k truncation of τ_t) with k = int(r/T)
    size, tasks = 6, 3
    deltas, expected = [], torch.zeros(size, size, dtype=D)
    for t in range(tasks):
        block = torch.zeros(size, size, dtype=D)
        block[2 * t:2 * t + 2, 2 * t:2 * t + 2] = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=D) * (t + 1)
        deltas.append(block)
        kept = torch.zeros(size, size, dtype=D)
        kept[2 * t, 2 * t] = 3.0 * (t + 1)          # k = int(6/3) = 2: both singular values kept
        kept[2 * t + 1, 2 * t + 1] = 1.0 * (t + 1)
        expected += kept
    assert torch.allclose(tsv_merge_tensor(deltas, alpha=1.0), expected, atol=1e-12)
    assert torch.allclose(tsv_merge_tensor(deltas, alpha=0.5), expected / 2, atol=1e-12)


def test_tsv_keeps_int_r_over_t_and_scales_non_matrices_by_the_mean():
    deltas = [_randn(5, 4, seed=s) for s in range(3)]          # r = 4, k = int(4/3) = 1
    merged = tsv_merge_tensor(deltas)
    assert torch.linalg.matrix_rank(merged) <= 3
    vectors = [_randn(7, seed=s) for s in range(3)]
    assert torch.allclose(tsv_merge_tensor(vectors, alpha=2.0), 2.0 * sum(vectors) / 3)
    assert torch.equal(tsv_merge_tensor([_randn(1, 5), _randn(1, 5, seed=1)]), torch.zeros(1, 5, dtype=D))  # r < T


def test_iso_c_flattens_the_spectrum_of_the_sum():
    deltas = [_randn(6, 4, seed=s) for s in range(3)]
    merged = iso_c_tensor(deltas, scaling_factor=2.0)
    s_sum = torch.linalg.svdvals(sum(deltas))
    assert torch.allclose(torch.linalg.svdvals(merged), torch.full((4,), 2.0 * float(s_sum.mean()), dtype=D))
    diagonal = [torch.diag(torch.tensor([4.0, 1.0], dtype=D)), torch.diag(torch.tensor([2.0, 1.0], dtype=D))]
    assert torch.allclose(iso_c_tensor(diagonal), torch.eye(2, dtype=D) * 4.0)   # mean of (6, 2)


def test_iso_cts_split_and_full_common_space_is_iso_c():
    assert iso_cts_split((768, 768), 8, 0.8) == (616, 19)    # k_c = 768 − round(154/8)·8, (768 − 616)/8
    assert iso_cts_split((10, 6), 3, 0.5) == (3, 1)
    deltas = [_randn(8, 6, seed=s) for s in range(3)]
    assert torch.allclose(iso_cts_tensor(deltas, 1.0, 1.0), iso_c_tensor(deltas, 1.0), atol=1e-12)
    merged = iso_cts_tensor(deltas, 1.0, 0.5)
    values = torch.linalg.svdvals(merged)
    assert torch.allclose(values, values[0].expand_as(values))            # isotropic
    assert torch.allclose(iso_cts_tensor([_randn(3, seed=s) for s in range(3)], 2.0), 2.0 * sum(_randn(3, seed=s) for s in range(3)) / 3)


def test_cart_closed_forms():
    deltas = [_randn(6, 5, seed=s) for s in range(3)]
    average = sum(deltas) / 3
    assert torch.allclose(cart_tensor(deltas, rank_ratio=1.0, scaling_factor=3.0), average, atol=1e-12)  # Σ c_t = 0
    pair = deltas[:2]                                                    # c_1 = −c_2: truncations cancel
    assert torch.allclose(cart_tensor(pair, rank_ratio=0.2, scaling_factor=1.7), sum(pair) / 2, atol=1e-12)
    k = cart_rank((6, 5), 0.4)
    assert k == 2 and cart_rank((6, 5), 0.01) == 1
    expected = average.clone()
    for delta in deltas:
        u, s, vh = torch.linalg.svd(delta - average)
        expected += 0.5 * (u[:, :k] @ torch.diag(s[:k]) @ vh[:k])
    assert torch.allclose(cart_tensor(deltas, 0.4, 0.5), expected, atol=1e-12)
    assert torch.allclose(cart_tensor([_randn(4, seed=s) for s in range(2)]), (_randn(4) + _randn(4, seed=1)) / 2)


def _wudi_autograd(deltas, steps, lr):
    """FusionBench's loop (autograd through the loss) in float64."""
    tvs = torch.stack(deltas)
    merged = torch.nn.Parameter(tvs.sum(0).clone())
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    norms = tvs.reshape(len(deltas), -1).norm(dim=-1).square()
    for _ in range(steps):
        loss = (torch.matmul(merged.unsqueeze(0) - tvs, tvs.transpose(1, 2)).square() / norms[:, None, None]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merged.detach()


@pytest.mark.parametrize("shape", [(5, 4), (4, 9), (12, 3)])
def test_wudi_matches_the_autograd_loop(shape):
    deltas = [_randn(*shape, seed=s) * 1e-2 for s in range(3)]
    assert torch.allclose(wudi_tensor(deltas, iter_num=0), sum(deltas), atol=1e-15)
    # one Adam step moves every entry by lr·|g|/(|g| + 1e-8) ≈ lr against the gradient's sign
    one = wudi_tensor(deltas, iter_num=1, lr=1e-3)
    assert torch.allclose((one - sum(deltas)).abs(), torch.full(shape, 1e-3, dtype=D), rtol=0.05)
    ours = wudi_tensor(deltas, iter_num=25, lr=1e-3)
    assert torch.allclose(ours, _wudi_autograd(deltas, 25, 1e-3), atol=1e-10)
    assert ours.dtype == D
    vectors = [_randn(6, seed=s) for s in range(3)]
    assert torch.allclose(wudi_tensor(vectors), sum(vectors) / 3)
    with pytest.raises(MergeError, match="zero"):
        wudi_tensor([torch.zeros(3, 3, dtype=D), _randn(3, 3)])


def test_consensus_by_hand():
    # three tasks on four entries; τ_MTL = column sums
    deltas = [torch.tensor(v, dtype=D) for v in ([1.0, 0.1, -2.0, 0.0], [1.0, 0.0, 2.0, 0.3], [0.5, 0.2, 1.0, -0.3])]
    mtl = multi_task_vector(deltas)
    assert torch.allclose(mtl, torch.tensor([2.5, 0.3, 1.0, 0.0], dtype=D))
    masks = tall_masks(deltas, mtl, 0.6)
    # |τ_t| > 0.6·|τ_MTL − τ_t|
    assert [m.tolist() for m in masks] == [[True, False, True, False], [True, False, True, True], [False, True, True, True]]
    assert torch.allclose(consensus_tensor(deltas, 0.6, 2, 1.0), torch.tensor([2.5, 0.0, 1.0, 0.0], dtype=D))
    assert torch.allclose(consensus_tensor(deltas, 0.6, 0, 0.5), mtl / 2)          # k = 0: task arithmetic
    assert torch.count_nonzero(consensus_tensor(deltas, 0.6, 4, 1.0)) == 0         # k > T: nothing
    ties = consensus_tensor(deltas, 0.6, 0, 1.0, "ties_merging", density=1.0)      # k = 0: TIES itself
    assert torch.allclose(ties, torch.tensor([2.5 / 3, 0.15, 1.5, 0.3], dtype=D))


def test_lines_scales_by_depth():
    assert lines_scale(None, 12, 0.25, 1.0) == 0.25
    assert lines_scale(0, 12, 0.25, 1.0) == 0.25 and lines_scale(11, 12, 0.25, 1.0) == 1.25
    assert math.isclose(lines_scale(3, 7, 0.1, 0.6), 0.1 + 0.6 * 3 / 6)
    assert lines_scale(0, 1, 0.5, 1.0) == 0.5
    deltas = [_randn(3, 3, seed=s) for s in range(4)]
    params = resolve_parameters("lines", {"beta": 0.5})
    merged = merge_tensor("lines", deltas, params, layer=2, num_layers=5)
    assert torch.allclose(merged, sum(deltas) * (0.25 + 0.5 * 2 / 4))            # α = 1/T on task arithmetic
    with pytest.raises(MergeError, match="set alpha"):
        merge_tensor("lines", deltas, resolve_parameters("lines", {"lines_base": "ties_merging"}), layer=0, num_layers=2)



def test_lines_on_state_dicts_scales_each_block_from_the_layer_map():
    """merge_state_dicts("lines") scales block ℓ's summed δ by α + β·ℓ/(L−1) with the blocks that
    block_layers reads from a BERT's names and config (embeddings and the pooler get α), and refuses to
    run without the map: without it every tensor got α, i.e. average merging (the GLUE benchmark's bug)."""
    from transformers import BertConfig

    from model_merging_methods import merge_state_dicts
    from utils.recipes.architecture import block_layers

    config = BertConfig(num_hidden_layers=3).to_dict()
    names = ["embeddings.word_embeddings.weight", *(f"encoder.layer.{i}.attention.self.query.weight" for i in range(3)),
             "encoder.layer.2.output.dense.bias", "pooler.dense.weight"]
    layers, depth = block_layers(config, names, "the encoder")
    assert depth == 3 and layers == {**{f"encoder.layer.{i}.attention.self.query.weight": i for i in range(3)},
                                     "encoder.layer.2.output.dense.bias": 2}
    base = {n: _randn(4, 4, seed=10 + i) for i, n in enumerate(names)}
    models = [{n: base[n] + _randn(4, 4, seed=20 + 7 * m + i) for i, n in enumerate(names)} for m in range(2)]
    merged = merge_state_dicts("lines", base, models, parameters={"beta": 0.5}, layers=(layers, depth))
    for name in names:
        scale = 0.5 + 0.5 * layers[name] / 2 if name in layers else 0.5
        expected = base[name] + scale * ((models[0][name] - base[name]) + (models[1][name] - base[name]))
        assert torch.allclose(merged[name], expected, atol=1e-6), name
    assert not torch.allclose(merged[names[3]], merge_state_dicts("average_merging", base, models)[names[3]])
    with pytest.raises(MergeError, match="layers="):
        merge_state_dicts("lines", base, models, parameters={"beta": 0.5})

def _pcb_reference(deltas, ratio):
    """The authors' PCB_merge, written from their formula with full sorts, in float64."""
    checks = torch.stack([d.reshape(-1) for d in deltas])
    n, d = checks.shape

    def clamp(x, lo, hi):
        s = torch.sort(x, dim=1).values
        return torch.clamp(x, s[:, int(d * lo)].unsqueeze(1), s[:, int(d * (1 - hi) - 1)].unsqueeze(1))

    def norm(x):
        low, high = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        return (x - low) / (high - low)

    magnitude = clamp(checks.abs(), 1e-4, 1e-4)
    score = torch.exp(n * norm(magnitude) ** 2) * torch.tanh(checks * checks.sum(0))
    scale = norm(clamp(score, 1 - ratio, 0))
    return ((torch.sign(checks) * magnitude * scale).sum(0) / torch.clamp(scale.sum(0), min=1e-12)).reshape(deltas[0].shape)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_pcb_matches_the_authors_formula(ratio):
    deltas = [_randn(40, 30, seed=s) * 1e-2 for s in range(3)]
    assert torch.allclose(pcb_tensor(deltas, ratio, 1.0), _pcb_reference(deltas, ratio), atol=1e-14)
    assert torch.allclose(pcb_tensor(deltas, ratio, 0.7), 0.7 * _pcb_reference(deltas, ratio), atol=1e-14)
    constant = [torch.full((5,), 0.1, dtype=D)] * 2            # the authors divide 0 by 0 here; we give weight 0
    assert torch.isfinite(pcb_tensor(constant, ratio)).all()


def test_parameters_are_validated_once():
    assert resolve_parameters("iso_cts") == {"scaling_factor": 1.0, "common_space_fraction": 0.8}
    assert resolve_parameters("wudi_merging", {"iter_num": 3.0})["iter_num"] == 3
    with pytest.raises(MergeError, match="unknown parameter.*'density'.*valid: rank_ratio, scaling_factor"):
        resolve_parameters("cart", {"density": 0.5})
    for method, name in [("cart", "rank_ratio"), ("iso_cts", "common_space_fraction"), ("pcb_merging", "pcb_ratio")]:
        for bad in (0.0, 1.5, -0.1):
            with pytest.raises(MergeError, match=f"{name}.*in \\(0, 1\\]"):
                resolve_parameters(method, {name: bad})
    with pytest.raises(MergeError, match="iter_num.*integer"):
        resolve_parameters("wudi_merging", {"iter_num": 2.5})
    with pytest.raises(MergeError, match="consensus_base.*task_arithmetic, ties_merging"):
        resolve_parameters("consensus_merging", {"consensus_base": "dare"})


def test_float32_inputs_keep_their_dtype_and_shape():
    deltas = [torch.randn(8, 6, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for method in ("tsv_merging", "iso_c", "iso_cts", "cart", "wudi_merging", "consensus_merging", "lines", "pcb_merging"):
        params = resolve_parameters(method, {"iter_num": 2} if method == "wudi_merging" else {})
        merged = merge_tensor(method, deltas, params, layer=0, num_layers=2)
        assert merged.shape == (8, 6) and merged.dtype == torch.float32 and torch.isfinite(merged).all(), method


def test_group_calls_merge_in_float32_with_per_model_weights():
    from model_merging_methods import frontier
    from model_merging_methods.recipe_methods import TensorGroupCall

    generator = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=generator).to(torch.bfloat16)
    models = [torch.randn(6, 5, generator=generator).to(torch.bfloat16) for _ in range(3)]
    tensors = {"base": base, **{f"m{i}": m for i, m in enumerate(models)}}
    call = TensorGroupCall(tensors, "base", params={"alpha": 0.5}, per_input={"m0": {"weight": 2.0}, "m1": {}, "m2": {}})
    out = frontier.tsv_merging(call)
    deltas = [m.float() - base.float() for m in models]
    deltas[0] *= 2.0
    assert out.dtype == torch.float32
    assert torch.allclose(out, base.float() + tsv_merge_tensor(deltas, 0.5), atol=1e-6)
    for method in frontier.FRONTIER_METHODS:
        params = resolve_parameters(method, {"iter_num": 1} if method == "wudi_merging" else {})
        result = getattr(frontier, method)(TensorGroupCall(tensors, "base", params=params))
        assert result.shape == base.shape and torch.isfinite(result).all(), method


def test_pcb_float32_order_statistics_equal_kthvalue():
    from model_merging_methods.pcb import _row_kth

    generator = torch.Generator().manual_seed(5)
    rows = torch.randn(3, 1000, generator=generator)
    rows[1, :10] = 0.0
    rows[2] = rows[2].abs()
    indices = [0, 1, 137, 499, 500, 998, 999]
    for row in rows:
        for signed in (True, False):
            values = row if signed else row.abs()
            found = _row_kth(lambda s, values=values: values[s], values, indices, signed=signed)
            expected = [torch.kthvalue(values, index + 1).values for index in indices]
            assert [float(v) for v in found] == [float(v) for v in expected]
    deltas = [torch.randn(30, 20, generator=generator) * 1e-2 for _ in range(3)]
    assert torch.allclose(pcb_tensor(deltas, 0.2), _pcb_reference([d.double() for d in deltas], 0.2).float(), atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pcb_blocks_give_the_whole_rows_bits(monkeypatch, dtype):
    """PCB's statistics first, then its elementwise steps block by block: any block size gives the bits of
    one block (whole rows), with ties, zeros of both signs and a constant task."""
    from model_merging_methods import recipe_methods

    generator = torch.Generator().manual_seed(6)
    deltas = [torch.randn(40, 70, generator=generator, dtype=dtype) * 1e-3 for _ in range(3)]
    deltas[0][:5] = 0.0
    deltas[1][:3] = -0.0
    deltas[2] = torch.randint(-2, 3, (40, 70), generator=generator).to(dtype) * 1e-3
    constant = [deltas[0], torch.full((40, 70), 0.25, dtype=dtype)]
    integer = torch.int32 if dtype == torch.float32 else torch.int64
    for case in (deltas, constant):
        for ratio in (0.1, 1.0):
            monkeypatch.setattr(recipe_methods, "ELEMENTWISE_BLOCK", 1 << 30)
            whole = pcb_tensor(case, ratio, 0.7)
            monkeypatch.setattr(recipe_methods, "ELEMENTWISE_BLOCK", 333)
            assert torch.equal(pcb_tensor(case, ratio, 0.7).view(integer), whole.view(integer))


def test_randomized_svd_is_bounded_by_the_exact_truncation():
    """CART's svd=randomized: on task-vector-like matrices (a decaying spectrum plus noise) the merged tensor
    is within 1e-3 (relative Frobenius) of the exact method's; on a flat Gaussian spectrum, the worst case,
    its rank-k error stays within 5% of the Eckart–Young optimum; and it is deterministic."""
    from model_merging_methods.subspace import cart_tensor, low_rank, top_svd

    def task_matrix(seed, m=300, n=200):
        generator = torch.Generator().manual_seed(seed)
        left, right = torch.randn(m, 40, generator=generator), torch.randn(40, n, generator=generator)
        decay = torch.logspace(0, -3, 40)
        return (left * decay) @ right + 1e-4 * torch.randn(m, n, generator=generator)

    deltas = [task_matrix(s) for s in range(3)]
    for ratio in (0.1, 0.3):
        exact, randomized = cart_tensor(deltas, ratio), cart_tensor(deltas, ratio, svd="randomized")
        assert float((randomized - exact).norm() / exact.norm()) < 1e-3
    flat = torch.randn(400, 300, generator=torch.Generator().manual_seed(5))
    optimum = float((flat - low_rank(flat, 30)).norm())
    approximate = float((flat - low_rank(flat, 30, svd="randomized")).norm())
    assert optimum <= approximate <= 1.05 * optimum
    first, second = top_svd(flat, 30, "t", "randomized"), top_svd(flat, 30, "t", "randomized")
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(MergeError, match="'svd' must be one of exact, randomized"):
        resolve_parameters("cart", {"svd": "fast"})
