"""LoRA in and out: `base+adapter` inputs applied in weight space, adapter extraction, merges written as adapters."""

# Registers the base+adapter reference kind with sources/ (which may not import lora/ itself).
from mergesmith.lora import inputs as _inputs  # noqa: F401
