"""Custom search objectives for the tests, plugged in as `python: search_tasks:kl_to_target`."""

from __future__ import annotations

import os
import time
from typing import Any

import torch


class KLToTarget:
    """Score = -KL(target || candidate) of the next-token distributions on fixed token sequences."""

    def __init__(
        self,
        target: str,
        sequences: int = 4,
        length: int = 12,
        seed: int = 0,
        delay: float = 0.0,
        die_once: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.name = "kl"
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, model.config.vocab_size, (sequences, length), generator=gen)
        with torch.no_grad():
            self.target = torch.log_softmax(model(self.ids).logits.float(), dim=-1)
        self.delay = delay
        self.die_once = die_once

    def evaluate(self, model: Any, tokenizer: Any) -> dict[str, float]:
        if self.die_once:
            try:  # O_EXCL: exactly one process, on its first evaluation, wins the marker and dies
                os.close(os.open(self.die_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        if self.delay:
            time.sleep(self.delay)
        logp = torch.log_softmax(model(self.ids).logits.float(), dim=-1)
        kl = (self.target.exp() * (self.target - logp)).sum(-1).mean()
        return {"neg_kl": -float(kl)}


def kl_to_target(**kwargs: Any) -> KLToTarget:
    return KLToTarget(**kwargs)


def kl_to_holdout_target() -> KLToTarget:
    """For `--holdout python:search_tasks:kl_to_holdout_target` (no args on the command line): the
    target directory comes from $MERGESMITH_TEST_HOLDOUT_TARGET, and other token sequences (seed 7)."""
    task = KLToTarget(os.environ["MERGESMITH_TEST_HOLDOUT_TARGET"], seed=7)
    task.name = "kl_holdout"
    return task
