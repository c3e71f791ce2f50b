"""Custom search objectives for the tests, plugged in as `python: search_tasks:kl_to_target`."""

from __future__ import annotations

import time
from typing import Any

import torch


class KLToTarget:
    """Score = -KL(target || candidate) of the next-token distributions on fixed token sequences."""

    def __init__(self, target: str, sequences: int = 4, length: int = 12, seed: int = 0, delay: float = 0.0) -> None:
        from transformers import AutoModelForCausalLM

        self.name = "kl"
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, model.config.vocab_size, (sequences, length), generator=gen)
        with torch.no_grad():
            self.target = torch.log_softmax(model(self.ids).logits.float(), dim=-1)
        self.delay = delay

    def evaluate(self, model: Any, tokenizer: Any) -> dict[str, float]:
        if self.delay:
            time.sleep(self.delay)
        logp = torch.log_softmax(model(self.ids).logits.float(), dim=-1)
        kl = (self.target.exp() * (self.target - logp)).sum(-1).mean()
        return {"neg_kl": -float(kl)}


def kl_to_target(**kwargs: Any) -> KLToTarget:
    return KLToTarget(**kwargs)
