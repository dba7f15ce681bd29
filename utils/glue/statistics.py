"""Statistics for Fisher merging and RegMean, collected as the original MergeLM does.

Diagonal Fisher of one model (eval mode, dropout off), over batches of its train split:
  classification: s_b = Σ_{i∈batch} Σ_c sqrt(stopgrad(p_ic)) · log p_ic with p_i = softmax(logits_i);
  regression (one output): s_b = mean_{i∈batch} (logit_i − y_i)²  (the model's MSE loss);
  batch Fisher F_b = (∂s_b/∂θ)², elementwise — the square of the gradient of the batch SUM, so it
  contains cross-example terms (not the per-example empirical Fisher);
  F = Σ_b F_b / (n_batches · batch_size). Batches are consumed while the counter, increased by the
  nominal batch size per batch, is below N (so N rounds up to a multiple of the batch size and a
  short last batch still counts as a full one).
RegMean Gram matrices: a forward hook on every ``nn.Linear`` flattens its input x to rows (all token
positions, padding included) and keeps the running mean G = Σ_rows x xᵀ / #rows; batches (no grad)
are fed while the number of sequences seen by the first hooked module is below N.
Both return tensors keyed the way ``model_merging_methods.merge_state_dicts(statistics=...)`` expects:
Fisher ``{param_name: tensor shaped like the parameter}``, RegMean ``{"<module>.weight": [in, in]}``.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from model_merging_methods import is_excluded
from utils.glue.training import model_logits, to_device


def _check_examples(num_examples: int) -> None:
    if int(num_examples) <= 0:
        raise ValueError(f"the number of statistics examples must be positive, got {num_examples}")


def fisher_objective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """s_b of the module docstring for one batch of logits (labels are used only for regression)."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits[:, 0], labels.float())
    probabilities = torch.softmax(logits, dim=-1)
    return (torch.sqrt(probabilities).detach() * torch.log_softmax(logits, dim=-1)).sum()


def diagonal_fisher(
    model: nn.Module,
    loader,
    num_examples: int,
    device,
    *,
    exclude_regex: Sequence[str] = (),
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of every non-excluded trainable parameter (module docstring), on CPU, float32."""
    _check_examples(num_examples)
    batch_size = loader.batch_size
    if num_examples % batch_size != 0:
        warnings.warn(f"nums_fisher_examples {num_examples} is not a multiple of the batch size {batch_size}", stacklevel=2)
    model.to(device).eval()
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad and not is_excluded(name, exclude_regex)]
    parameters = dict(model.named_parameters())
    sums = {name: torch.zeros_like(parameters[name], dtype=torch.float32) for name in names}
    counted = 0
    bar = tqdm(total=num_examples, desc="fisher", disable=not progress, leave=False)
    for batch in loader:
        if counted >= num_examples:
            break
        batch = to_device(batch, device)
        model.zero_grad(set_to_none=True)
        fisher_objective(model_logits(model, batch), batch["labels"]).backward()
        for name in names:
            gradient = parameters[name].grad
            if gradient is not None:
                sums[name] += gradient.detach().float() ** 2
        counted += batch_size
        bar.update(batch_size)
    bar.close()
    model.zero_grad(set_to_none=True)
    if counted == 0:
        raise ValueError("no batches for the Fisher statistics: the data loader is empty")
    return {name: (value / counted).cpu() for name, value in sums.items()}


def regmean_gram_matrices(
    model: nn.Module,
    loader,
    num_examples: int,
    device,
    *,
    exclude_regex: Sequence[str] = (),
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Running-mean Gram matrices of the inputs of every ``nn.Linear`` (module docstring), on CPU.

    Keys are ``<module>.weight``; modules whose weight is excluded are hooked (as in the original) but
    left out of the result.
    """
    _check_examples(num_examples)
    model.to(device).eval()
    grams: dict[str, torch.Tensor] = {}
    rows_seen: dict[str, int] = {}
    sequences_seen: dict[str, int] = {}

    def make_hook(module_name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach().float()
            sequences = x.shape[0]
            x = x.reshape(-1, x.shape[-1])
            xtx = x.transpose(0, 1) @ x
            if module_name not in grams:
                grams[module_name] = xtx / x.shape[0]
                rows_seen[module_name], sequences_seen[module_name] = x.shape[0], sequences
            else:
                total = rows_seen[module_name] + x.shape[0]
                grams[module_name] = (grams[module_name] * rows_seen[module_name] + xtx) / total
                rows_seen[module_name] = total
                sequences_seen[module_name] += sequences

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not handles:
        raise ValueError("the model has no nn.Linear module, so RegMean has nothing to collect")
    bar = tqdm(total=num_examples, desc="regmean", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for batch in loader:
                if sequences_seen and next(iter(sequences_seen.values())) >= num_examples:
                    break
                batch = to_device(batch, device)
                model_logits(model, batch)
                bar.update(batch["input_ids"].shape[0])
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
    if not grams:
        raise ValueError("no batches for the RegMean statistics: the data loader is empty")
    return {f"{name}.weight": gram.cpu() for name, gram in grams.items() if not is_excluded(f"{name}.weight", exclude_regex)}
