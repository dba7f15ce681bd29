"""Router ("gate") matrices of the MoE, computed once before any expert tensor is written.

For layer l the router maps a token's hidden state x (d) to one logit per expert, logits = G_l x, with
G_l of shape (E, d). The modes follow mergekit-moe's router module (its `get_gate_params`):

* ``hidden`` (= ``hidden_last``), mergekit-moe's: the base model in bfloat16 runs on each expert's prompts as
  one batch (each prompt preceded by the tokenizer's BOS token as text, left-padded with the BOS token, or
  EOS where there is none); per layer l take h_l, the residual stream entering layer l (hidden_states[l] of
  transformers, l = 0..L-1), at the last position, averaged over the prompts in bfloat16:
  g_l = normalize(mean_pos h_l − mean_neg h_l), all in bfloat16 (the negative term only when negative
  prompts are given), exactly as mergekit-moe 0.1.5's ``get_gate_params``.
* ``hidden_avg``, mergekit-moe's: the same, with h_l averaged over the padded batch's positions (pad
  positions included, as mergekit-moe does) instead of the last one.
* ``hidden_mean`` (this project's; before this name existed it was ``hidden``): the base model in its own
  dtype, each prompt alone (no padding), h_l averaged over the prompt's tokens in float32, then over the
  prompts.
* ``cheap_embed``: the token embeddings instead of hidden states, the same vector in every layer:
  g = normalize(normalize(Σ_pos e_t) − normalize(Σ_neg e_t)).
* ``random``: N(0, 1) entries; ``uniform_random``: U(−1/√d, 1/√d) (torch.nn.Linear's default init).
  Drawn per output tensor from a PCG64 generator seeded by (seed, tensor name)
  (model_merging_methods/randomness.py), so a gate does not depend on the order or number of other tensors.

normalize(v) = v / max(‖v‖₂, 1e-8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from model_merging_methods.randomness import derive_seed

NORM_FLOOR = 1e-8
DEGENERATE_CONDITION = 5.0   # mergekit-moe's warning threshold on cond(G_l)


def seeded_normal(seed: int, index: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 N(0, 1) draws that depend only on (seed, index, tensor name)."""
    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, index, name)))
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))


def seeded_uniform(seed: int, index: int, name: str, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    """float32 U[low, high) draws that depend only on (seed, index, tensor name)."""
    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, index, name)))
    return torch.from_numpy(rng.random(shape, dtype=np.float32)).mul_(high - low).add_(low)


def random_gate(mode: str, seed: int, name: str, rows: int, hidden_size: int) -> torch.Tensor:
    """One router tensor (rows, d) of the random modes, seeded by its output tensor name."""
    if mode == "random":
        return seeded_normal(seed, 0, name, (rows, hidden_size))
    bound = math.sqrt(1.0 / hidden_size)
    return seeded_uniform(seed, 0, name, (rows, hidden_size), -bound, bound)


def normalize(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(p=2, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)


@dataclass
class PromptStatistics:
    """What the prompt gates were computed from (for the manifest)."""

    prompts: int = 0
    tokens: int = 0


MERGEKIT_HIDDEN_MODES = ("hidden", "hidden_last", "hidden_avg")


class PromptEncoder:
    """Per-layer summaries of prompts: hidden states of the base model (mergekit-moe's batched bfloat16 pass, or
    this project's per-prompt float32 mean), or token embeddings."""

    def __init__(self, mode: str, model_path, embeddings: torch.Tensor | None, num_layers: int, device: str):
        from transformers import AutoTokenizer

        self.mode, self.num_layers, self.device = mode, num_layers, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = None
        self.embeddings = embeddings
        if mode in MERGEKIT_HIDDEN_MODES:
            # mergekit-moe: left padding with the BOS token (EOS where there is none)
            self.tokenizer.padding_side = "left"
            self.tokenizer.pad_token_id = self.tokenizer.bos_token_id
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        if mode != "cheap_embed":
            from transformers import AutoModelForCausalLM

            dtype = torch.bfloat16 if mode in MERGEKIT_HIDDEN_MODES else "auto"
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()

    def token_ids(self, prompt: str) -> torch.Tensor:
        # mergekit-moe: the BOS token as text, then the prompt, with no other special tokens
        ids = self.tokenizer((self.tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            ids = [self.tokenizer.eos_token_id or 0]
        return torch.tensor([ids], device=self.device)

    @torch.no_grad()
    def hidden_batch(self, prompts: list[str], stats: PromptStatistics) -> torch.Tensor:
        """(L, d) in bfloat16, mergekit-moe's ``get_hidden_states``: one left-padded batch; per layer the last
        position's (or, for hidden_avg, the padded positions' mean) hidden state, averaged over the prompts."""
        batch = self.tokenizer([(self.tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt",
                               padding=True, add_special_tokens=False).to(self.device)
        stats.prompts += len(prompts)
        stats.tokens += int(batch["attention_mask"].sum())
        states = torch.stack(self.model(**batch, output_hidden_states=True, return_dict=True).hidden_states[:-1])
        if self.mode == "hidden_avg":
            states = states.sum(dim=2) / states.shape[2]       # (L, B, d): pad positions included
        else:
            states = states[:, :, -1, :]
        return states.sum(dim=1) / states.shape[1]

    @torch.no_grad()
    def hidden_mean(self, prompts: list[str], stats: PromptStatistics) -> torch.Tensor:
        """(L, d) float32: per layer, the mean over prompts of the token-averaged layer input (hidden_mean)."""
        total = None
        for prompt in prompts:
            ids = self.token_ids(prompt)
            stats.prompts += 1
            stats.tokens += ids.shape[1]
            states = self.model(input_ids=ids, output_hidden_states=True).hidden_states[:-1]
            summary = torch.stack([state[0].float() for state in states]).mean(dim=1)     # (L, d)
            total = summary if total is None else total + summary
        return total / len(prompts)

    @torch.no_grad()
    def embedding_direction(self, prompts: list[str], stats: PromptStatistics) -> torch.Tensor:
        """(d,): the normalised sum of the prompts' token embeddings."""
        total = torch.zeros(self.embeddings.shape[1], dtype=torch.float32, device=self.device)
        for prompt in prompts:
            ids = self.token_ids(prompt)[0]
            stats.prompts += 1
            stats.tokens += ids.shape[0]
            total += self.embeddings[ids].float().sum(dim=0)
        return normalize(total)

    def gate_vectors(self, positive: list[str], negative: list[str] | None,
                     stats: PromptStatistics) -> torch.Tensor:
        """(L, d) unit router rows of one expert."""
        if self.mode == "cheap_embed":
            vector = self.embedding_direction(positive, stats)
            if negative:
                vector = vector - self.embedding_direction(negative, stats)
            return normalize(vector).expand(self.num_layers, -1).clone()
        summarize = self.hidden_batch if self.mode in MERGEKIT_HIDDEN_MODES else self.hidden_mean
        vectors = summarize(positive, stats)
        if negative:
            vectors = vectors - summarize(negative, stats)
        return normalize(vectors)

    def close(self) -> None:
        self.model = None
        self.embeddings = None


def prompt_gates(encoder: PromptEncoder, experts) -> tuple[torch.Tensor, list[dict]]:
    """(L, n, d) router rows (bfloat16 for mergekit-moe's hidden modes, else float32), one per expert config, on the CPU; and per-expert prompt statistics."""
    rows, described = [], []
    for expert in experts:
        stats = PromptStatistics()
        rows.append(encoder.gate_vectors(expert.positive_prompts, expert.negative_prompts, stats).cpu())
        described.append({"prompts": stats.prompts, "tokens": stats.tokens})
    return torch.stack(rows, dim=1), described


def condition_numbers(gates: list[torch.Tensor]) -> list[float]:
    """cond(G_l) per layer (ratio of largest to smallest singular value); large = experts hard to tell apart."""
    numbers = []
    for gate in gates:
        singular = torch.linalg.svdvals(gate.double())
        numbers.append(float(singular[0] / singular[-1]) if singular[-1] > 0 else math.inf)
    return numbers
