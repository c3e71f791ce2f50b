"""Forward (and backward) passes of one model over its calibration prompts, collecting the statistics
a data-aware method needs:

- `gram`: for every linear layer, the Gram matrix G = Σ x xᵀ of its inputs over every token
  (RegMean, Jin et al. 2023), in float64 while it accumulates, keyed by the layer's weight name;
- `fisher`: for every parameter, the diagonal Fisher information of the model's predictive
  distribution, F = mean over the samples of (∂ log p(ŷ | sample) / ∂θ)², ŷ drawn from the model
  (Fisher merging, Matena & Raffel 2022), keyed by the parameter's name.

Each prompt is run alone (batch of one, no padding), truncated to `max_length` tokens. The model is
loaded in float32 on `device`, used, and released: one model is resident at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger("mergesmith")

Kind = Literal["gram", "fisher"]


def _load(directory: Path, device: str):  # -> (model, tokenizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device)
    return model, AutoTokenizer.from_pretrained(directory)


def _ids(tokenizer, text: str, max_length: int, device: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).input_ids
    return ids.to(device)


def collect(kind: Kind, directory: Path, texts: list[str], max_length: int, device: str = "cpu") -> dict:
    """The statistics of `kind` for the model in `directory` over `texts`, as float32 CPU tensors."""
    model, tokenizer = _load(directory, device)
    try:
        return (
            _grams(model, tokenizer, texts, max_length, device)
            if kind == "gram"
            else _fisher(model, tokenizer, texts, max_length, device)
        )
    finally:
        del model


def _grams(model, tokenizer, texts: list[str], max_length: int, device: str) -> dict[str, torch.Tensor]:
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str):
        def accumulate(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            g = x.T @ x
            sums[name] = g if name not in sums else sums[name].add_(g)

        return accumulate

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(hook(f"{name}.weight")))
    try:
        with torch.no_grad():
            for text in texts:
                model(_ids(tokenizer, text, max_length, device))
    finally:
        for h in hooks:
            h.remove()
    return {k: v.float().cpu() for k, v in sums.items()}


def _fisher(model, tokenizer, texts: list[str], max_length: int, device: str) -> dict[str, torch.Tensor]:
    """Matena & Raffel's Fisher is that of the model's own predictive distribution,
    E_x E_{y ~ p(y|x)} (∂ log p(y|x) / ∂θ)², not the empirical Fisher of the data's tokens: a
    fine-tune that fits its data has near-zero gradients on it, and prompt-only data would measure
    how well the model predicts the prompt. At every position of a prompt one label is drawn from
    the model's next-token distribution (generator seeded with the prompt's index, so statistics
    are reproducible); the sample's gradient is that of the drawn labels' summed log-likelihood,
    whose square is, in expectation, the sum of the positions' Fishers."""
    model.eval()  # no dropout: the statistics are those of the model as it runs
    params = dict(model.named_parameters())
    sums = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    for n, text in enumerate(texts):
        ids = _ids(tokenizer, text, max_length, device)
        model.zero_grad(set_to_none=True)
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        gen = torch.Generator(device=logp.device).manual_seed(n)
        drawn = torch.multinomial(logp.detach().exp(), 1, generator=gen)
        logp.gather(1, drawn).sum().backward()
        for name, p in params.items():
            if p.grad is not None:
                sums[name].add_(p.grad.double().square())
    model.zero_grad(set_to_none=True)
    return {k: (v / max(len(texts), 1)).float().cpu() for k, v in sums.items()}
