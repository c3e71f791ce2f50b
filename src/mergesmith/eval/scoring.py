"""The two measurements of JSONL tasks, batched: greedy exact match and choice log-likelihoods.

Encoding follows lm-eval-harness so the same examples score the same there and here: the
tokenizer's own special tokens, trailing whitespace of a prompt moved into the continuation, and
the continuation's tokens taken from the encoding of prompt + continuation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mergesmith.eval.examples import AnswerExample, ChoiceExample

ANSWER_MARGIN = 2  # extra new tokens beyond the longest answer, so "answer + more" is seen as wrong


def summarise(values: dict[str, Sequence[float]]) -> dict[str, float]:
    """Mean, standard error of the mean (sample std / sqrt(n), as lm-eval) and `n` per metric."""
    out: dict[str, float] = {}
    for metric, xs in values.items():
        n = len(xs)
        mean = sum(xs) / n if n else float("nan")
        var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
        out[metric] = mean
        out[f"{metric}_stderr"] = math.sqrt(var / n) if n else float("nan")
        out["n"] = n
    return out


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    return sorted(ids)


def _pad_id(tokenizer: Any, eos: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return eos[0] if eos else 0


def cut_continuation(text: str, stop: Sequence[str]) -> str:
    """The continuation up to the first stop string, surrounding whitespace stripped."""
    end = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:end].strip()


@torch.inference_mode()
def greedy_continuations(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, *, batch_size: int = 8
) -> list[str]:
    """Greedy continuations of `prompts`, batched and left-padded, each cut at its first end-of-sequence."""
    from transformers import GenerationConfig

    eos = _eos_ids(model, tokenizer)
    pad = _pad_id(tokenizer, eos)
    encoded = [tokenizer.encode(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos or None
    )
    device = _device(model)
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i])
            mask[row, width - n :] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)[
            :, width:
        ].tolist()
        for row, i in enumerate(idx):
            tokens = gen[row]
            ends = [k for k, t in enumerate(tokens) if t in eos]
            tokens = tokens[: ends[0]] if ends else tokens
            out[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return out


def exact_match(model: Any, tokenizer: Any, examples: Sequence[AnswerExample], *, batch_size: int = 8) -> list[float]:
    """1.0 where the greedy continuation (cut at EOS or a stop string, stripped) equals the stripped answer."""
    longest = max(len(tokenizer.encode(e.answer, add_special_tokens=False)) for e in examples)
    texts = greedy_continuations(
        model, tokenizer, [e.prompt for e in examples], longest + ANSWER_MARGIN, batch_size=batch_size
    )
    return [float(cut_continuation(t, e.stop) == e.answer.strip()) for t, e in zip(texts, examples, strict=True)]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval encodes them for a causal model."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context) if context else []
    if not ctx:  # an empty prompt is conditioned on the BOS (or EOS) token, as in lm-eval
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], whole
    return ctx, whole[len(ctx) :]


@torch.inference_mode()
def loglikelihoods(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 8
) -> list[float]:
    """Summed log-probability of each continuation given its context, batched and right-padded."""
    device = _device(model)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    seqs = []
    for ctx, cont in pairs:
        seq = (ctx + cont)[:-1]
        if limit and len(seq) > limit:
            seq = seq[-limit:]  # left-truncate the context, as lm-eval
        seqs.append(seq)
    order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i]))
    out = [0.0] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[row, : len(seqs[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, i in enumerate(idx):
            cont = pairs[i][1]
            n, m = len(seqs[i]), len(cont)
            target = torch.tensor(cont, device=logprobs.device)
            out[i] = float(logprobs[row, n - m : n].gather(1, target[:, None]).sum())
    return out


def choice_separator(prompt: str, choice: str) -> str:
    """A space between prompt and choice unless either side already has whitespace there."""
    return "" if not prompt or prompt[-1].isspace() or choice[:1].isspace() else " "


def choice_accuracy(
    model: Any, tokenizer: Any, examples: Sequence[ChoiceExample], *, batch_size: int = 8
) -> dict[str, list[float]]:
    """`acc` (argmax of summed log-likelihood) and `acc_norm` (divided by the choice's length in characters)."""
    pairs = [encode_pair(tokenizer, e.prompt, choice_separator(e.prompt, c) + c) for e in examples for c in e.choices]
    lls = loglikelihoods(model, tokenizer, pairs, batch_size=batch_size)
    acc, acc_norm, k = [], [], 0
    for e in examples:
        scores = lls[k : k + len(e.choices)]
        k += len(e.choices)
        norm = [s / len(c) for s, c in zip(scores, e.choices, strict=True)]
        acc.append(float(max(range(len(scores)), key=scores.__getitem__) == e.label))
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == e.label))
    return {"acc": acc, "acc_norm": acc_norm}
