"""LoRA in and out: `base+adapter` inputs applied in weight space, adapter extraction, merges written as adapters."""
