"""Real peft adapters on the tiny test models, with every trained tensor randomised (nonzero)."""

from __future__ import annotations

from pathlib import Path

import torch


def build_adapter(base: Path, out: Path, seed: int = 0, **config: object) -> dict[str, torch.Tensor]:
    """Save a peft LoRA adapter of `base` to `out`; return peft's merge_and_unload state dict."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * (0.2 if "magnitude" in name else 0.05))
    peft_model.save_pretrained(out)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
