"""Router initialisation: one gate row per (layer, expert), as mergekit-moe computes it.

- `hidden` / `hidden_last`: the base model's hidden state *entering* each layer at the last token,
  averaged over the prompts; `hidden_avg`: averaged over all positions (padding included).
  Positive minus negative prompts, then L2-normalised.
- `cheap_embed`: the normalised sum of the prompts' token embeddings (negative: minus the same),
  normalised again; the same row for every layer.
- `random`: N(0, 1); `uniform_random`: U(-1/sqrt(hidden), 1/sqrt(hidden)); seeded.

Prompts are BOS-prefixed and left-padded in one batch per expert, as mergekit does.
"""

from __future__ import annotations

import math
from typing import Any

from mergesmith.lazy_torch import torch

EPS = 1e-8
CONDITION_LIMIT = 5.0


def tokenize(tokenizer: Any, prompts: list[str]) -> Any:
    return tokenizer(
        [(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False
    )


def prepare_tokenizer(tokenizer: Any) -> Any:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
    return tokenizer


def hidden_rows(model: Any, batch: Any, average: bool) -> torch.Tensor:
    """(layers, hidden) float32: the state entering each layer, at the last token or averaged over
    positions, then averaged over the prompts."""
    with torch.no_grad():
        out = model(**batch.to(model.device), output_hidden_states=True, return_dict=True)
    states = torch.stack(out.hidden_states[:-1]).float()  # (layers, batch, seq, hidden)
    per_prompt = states.mean(dim=2) if average else states[:, :, -1, :]
    return per_prompt.mean(dim=1).cpu()


def embed_row(embed: torch.Tensor, batch: Any) -> torch.Tensor:
    """(hidden,) float32: the normalised sum of the embedding rows of every real token."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = embed.float()[ids] * mask.unsqueeze(-1)
    total = rows.sum(dim=(0, 1))
    return total / total.norm().clamp(min=EPS)


def normalise(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(p=2, dim=-1, keepdim=True).clamp(min=EPS)


def prompt_gates(
    mode: str,
    prompts: list[tuple[list[str], list[str]]],
    layers: int,
    tokenizer: Any,
    model: Any = None,
    embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """(layers, experts, hidden) float32 for `hidden*` (needs `model`) or `cheap_embed` (needs `embed`)."""

    def rows(texts: list[str]) -> torch.Tensor:
        batch = tokenize(tokenizer, texts)
        if mode == "cheap_embed":
            assert embed is not None
            return embed_row(embed, batch).expand(layers, -1)
        return hidden_rows(model, batch, average=mode == "hidden_avg")

    out = []
    for positive, negative in prompts:
        r = rows(positive)
        if negative:
            r = r - rows(negative)
        out.append(normalise(r))
    return torch.stack(out, dim=1)


def random_gates(mode: str, layers: int, experts: int, hidden: int, generator: torch.Generator) -> torch.Tensor:
    if mode == "random":
        return torch.randn((layers, experts, hidden), generator=generator)
    bound = 1.0 / math.sqrt(hidden)
    return (torch.rand((layers, experts, hidden), generator=generator) * 2 - 1) * bound


def alike_experts(layer_gates: torch.Tensor, names: list[str], threshold: float = 0.9) -> list[tuple[str, str, float]]:
    """Pairs of experts whose gate rows point the same way (cosine >= threshold), most alike first;
    at least the most alike pair."""
    unit = normalise(layer_gates.float())
    cos = unit @ unit.T
    pairs = sorted(
        ((float(cos[i, j]), i, j) for i in range(len(names)) for j in range(i + 1, len(names))), reverse=True
    )
    chosen = [p for p in pairs if p[0] >= threshold] or pairs[:1]
    return [(names[i], names[j], c) for c, i, j in chosen]


def conditioning_warnings(gates: torch.Tensor, names: list[str], limit: float = CONDITION_LIMIT) -> list[str]:
    """One warning per layer whose gate matrix has a condition number above `limit`."""
    warnings = []
    for layer in range(gates.shape[0]):
        if gates.shape[1] < 2:
            break
        cond = float(torch.linalg.cond(gates[layer].float()))
        if cond > limit:
            pairs = ", ".join(f"{a} ~ {b} (cosine {c:.3f})" for a, b, c in alike_experts(gates[layer], names))
            warnings.append(
                f"layer {layer}: gate matrix is ill-conditioned (condition number {cond:.3g} > {limit:g});"
                f" experts that look alike: {pairs}. Their prompts may be too similar, and the router will"
                " underuse one of them"
            )
    return warnings
