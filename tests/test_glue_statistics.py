"""Fisher and RegMean statistics checked against formulas evaluated by hand (numpy) on tiny models."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from utils.glue.statistics import diagonal_fisher, regmean_gram_matrices


class LinearClassifier(nn.Module):
    """logits = W x + b on float features passed as ``input_ids``; ``classifier`` is a head name."""

    def __init__(self, features: int, outputs: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(features, outputs)
        self.classifier = nn.Linear(outputs, outputs)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.eye(outputs))
            self.classifier.bias.zero_()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return SimpleNamespace(logits=self.classifier(self.linear(input_ids)))


def loader_of(x: np.ndarray, y: np.ndarray, batch_size: int, dtype=torch.float32) -> DataLoader:
    rows = [{"input_ids": torch.tensor(a, dtype=dtype), "labels": torch.tensor(b)} for a, b in zip(x, y)]

    def collate(items):
        return {"input_ids": torch.stack([i["input_ids"] for i in items]), "labels": torch.stack([i["labels"] for i in items])}

    return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate)


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def expected_classification_fisher(W, b, x, batch_size, batches):
    """Σ_b (∂s_b/∂W)² / (batches · batch_size), s_b = Σ_i Σ_c sqrt(p_ic)·log p_ic, sqrt(p) held constant.

    ∂s/∂z_ic = sqrt(p_ic) − p_ic · Σ_c' sqrt(p_ic'), so ∂s_b/∂W = Σ_i g_i x_iᵀ and ∂s_b/∂b = Σ_i g_i.
    """
    fisher_w, fisher_b = np.zeros_like(W), np.zeros_like(b)
    for k in range(batches):
        xb = x[k * batch_size : (k + 1) * batch_size]
        p = softmax(xb @ W.T + b)
        g = np.sqrt(p) - p * np.sqrt(p).sum(axis=-1, keepdims=True)
        fisher_w += (g.T @ xb) ** 2
        fisher_b += g.sum(axis=0) ** 2
    return fisher_w / (batches * batch_size), fisher_b / (batches * batch_size)


def test_classification_fisher_matches_hand_computation():
    rng = np.random.RandomState(0)
    x, y = rng.randn(6, 3), rng.randint(0, 2, 6)
    model = LinearClassifier(3, 2).double()
    loader = loader_of(x, y, batch_size=2, dtype=torch.float64)
    W = model.linear.weight.detach().numpy().copy()
    b = model.linear.bias.detach().numpy().copy()
    # N = 3 with batch 2: the counter goes 2 (< 3) then 4 -> two batches, divisor 2·2 = 4 (batch-sum semantics)
    with pytest.warns(UserWarning, match="not a multiple of the batch size"):
        fisher = diagonal_fisher(model, loader, 3, "cpu", exclude_regex=[".*classifier.*"])
    expected_w, expected_b = expected_classification_fisher(W, b, x, 2, 2)
    assert set(fisher) == {"linear.weight", "linear.bias"}
    np.testing.assert_allclose(fisher["linear.weight"].numpy(), expected_w, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(fisher["linear.bias"].numpy(), expected_b, rtol=1e-5, atol=1e-12)
    # the square of the batch sum is not the sum of per-example squares
    per_example = sum(
        (((np.sqrt(p) - p * np.sqrt(p).sum()))[:, None] * x[i][None, :]) ** 2
        for i, p in enumerate(softmax(x[:4] @ W.T + b))
    ) / 4
    assert not np.allclose(per_example, expected_w)


def test_regression_fisher_uses_mean_squared_error_gradient():
    rng = np.random.RandomState(1)
    x, y = rng.randn(4, 3), rng.randn(4).astype(np.float32)
    model = LinearClassifier(3, 1)
    W = model.linear.weight.detach().numpy().astype(np.float64)
    b = model.linear.bias.detach().numpy().astype(np.float64)
    fisher = diagonal_fisher(model, loader_of(x, y, 2), 4, "cpu", exclude_regex=[".*classifier.*"])
    expected = np.zeros_like(W)
    for k in range(2):
        xb, yb = x[2 * k : 2 * k + 2], y[2 * k : 2 * k + 2]
        residual = (xb @ W.T + b)[:, 0] - yb
        expected += ((2 * residual / 2)[None, :] @ xb) ** 2  # ∂ mean_i (z_i − y_i)² / ∂W
    np.testing.assert_allclose(fisher["linear.weight"].numpy(), expected / 4, rtol=1e-4)


class SequenceModel(nn.Module):
    """A token-level linear on [B, L, d] inputs, mean pooling, then a head linear on [B, h]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.token = nn.Linear(3, 2)
        self.classifier = nn.Linear(2, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return SimpleNamespace(logits=self.classifier(self.token(input_ids).mean(dim=1)))


def test_regmean_gram_matrices_by_hand():
    rng = np.random.RandomState(2)
    x = rng.randn(6, 4, 3).astype(np.float32)  # 6 sequences of 4 positions (padding included)
    model = SequenceModel()
    # N = 3 with batch 2: sequences seen 2 (< 3), then 4 -> stop; two batches = 8 rows per sequence position set
    grams = regmean_gram_matrices(model, loader_of(x, np.zeros(6, dtype=np.int64), 2), 3, "cpu")
    rows = x[:4].reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(grams["token.weight"].numpy(), rows.T @ rows / rows.shape[0], rtol=1e-5)
    with torch.no_grad():
        pooled = model.token(torch.from_numpy(x[:4])).mean(dim=1).double().numpy()
    np.testing.assert_allclose(grams["classifier.weight"].numpy(), pooled.T @ pooled / 4, rtol=1e-5)
    excluded = regmean_gram_matrices(model, loader_of(x, np.zeros(6, dtype=np.int64), 2), 3, "cpu", exclude_regex=[".*classifier.*"])
    assert set(excluded) == {"token.weight"}


def test_statistics_reject_bad_counts_and_empty_data():
    model = LinearClassifier(3, 2)
    with pytest.raises(ValueError, match="must be positive, got 0"):
        diagonal_fisher(model, loader_of(np.zeros((2, 3)), np.zeros(2, dtype=np.int64), 2), 0, "cpu")
    with pytest.raises(ValueError, match="data loader is empty"):
        regmean_gram_matrices(model, loader_of(np.zeros((0, 3)), np.zeros(0, dtype=np.int64), 2), 4, "cpu")


def _tiny_bert_members(seed_offset: int = 0):
    """Two tiny BERT classifiers that share the base's embeddings and differ in blocks, pooler and head."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).eval()
    models = []
    for k in range(2):
        model = BertForSequenceClassification(config).eval()
        generator = torch.Generator().manual_seed(100 + k + seed_offset)
        state = {n: t + (0.5 * torch.randn(t.shape, generator=generator) if "embeddings" not in n else 0.0)
                 for n, t in base.state_dict().items()}
        model.load_state_dict(state)
        models.append(model)
    generator = torch.Generator().manual_seed(7)
    rows = [{"input_ids": torch.randint(0, 30, (6,), generator=generator), "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": torch.tensor(0)} for _ in range(8)]

    def loader():
        return DataLoader(rows, batch_size=4, shuffle=False,
                          collate_fn=lambda items: {key: torch.stack([i[key] for i in items]) for key in items[0]})

    return base, models, loader


def test_regmean_plusplus_stages_and_first_block():
    from model_merging_methods import MergeOptions, merge_state_dicts
    from utils.glue.statistics import regmean_plusplus_merge, regmean_stages

    base, models, loader = _tiny_bert_members()
    exclude = [".*classifier.*"]
    states = [{n: t.clone() for n, t in m.state_dict().items()} for m in models]   # load_state_dict writes in place
    names = [n for n in base.state_dict() if not n.startswith("classifier")]
    stages = regmean_stages(models[0], names)
    assert len(stages) == 4 and all(n.startswith("bert.embeddings") for n in stages[0])
    assert stages[1][0].startswith("bert.encoder.layer.0.") and stages[3] == ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    merged = regmean_plusplus_merge(models, states, base.state_dict(), [loader, loader], [8, 8], 0.9, "cpu", exclude_regex=exclude)
    # the embeddings are the mean; the heads the base's
    for name in stages[0]:
        assert torch.allclose(merged[name], (states[0][name] + states[1][name]) / 2)
    assert torch.equal(merged["classifier.weight"], base.state_dict()["classifier.weight"])
    # block 0 sees the same inputs as plain RegMean (the embeddings agree), block 1 the merged block 0's output
    for model, state in zip(models, states):   # regmean_plusplus_merge leaves merged weights loaded
        model.load_state_dict(state)
    grams = [regmean_gram_matrices(m, loader(), 8, "cpu", exclude_regex=exclude) for m in models]
    plain = merge_state_dicts("regmean_merging", base.state_dict(), states, MergeOptions(regmean_alpha=0.9),
                              statistics=grams, exclude_regex=exclude)
    for name in stages[1]:
        assert torch.allclose(merged[name], plain[name], atol=1e-6), name
    query = "bert.encoder.layer.1.attention.self.query.weight"
    assert float((merged[query] - plain[query]).abs().max()) > 1e-3
    # block 1 by hand: each model's Gram on the hidden states of the merged embeddings and block 0
    hand = []
    for model, state in zip(models, states):
        model.load_state_dict({**state, **{n: merged[n] for n in stages[0] + stages[1]}})
        hand.append(regmean_gram_matrices(model, loader(), 8, "cpu", exclude_regex=exclude))
    expected = merge_state_dicts("regmean_merging", {n: base.state_dict()[n] for n in stages[2]},
                                 [{n: s[n] for n in stages[2]} for s in states], MergeOptions(regmean_alpha=0.9), statistics=hand)
    for name in stages[2]:
        assert torch.allclose(merged[name], expected[name], atol=1e-6), name
