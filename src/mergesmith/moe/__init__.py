"""Mixture-of-experts models from dense fine-tunes of one base (mergekit-moe configs)."""

from mergesmith.moe.config import MoEConfig, load_moe_config, validate_moe_config

__all__ = ["MoEConfig", "load_moe_config", "validate_moe_config"]
