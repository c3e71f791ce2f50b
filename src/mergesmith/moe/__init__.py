"""Mixture-of-experts models from dense fine-tunes of one base (mergekit-moe configs).

Importing the package registers MoE's preparation with `preparation.prepare_merge` (moe.prepare)."""

from mergesmith.moe.config import MoEConfig, load_moe_config
from mergesmith.moe.prepare import validate_moe_config

__all__ = ["MoEConfig", "load_moe_config", "validate_moe_config"]
