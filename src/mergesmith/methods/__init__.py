"""Merge methods. Importing this package registers every method in `registry.METHODS`."""

from mergesmith.methods import (  # noqa: F401
    arcee_fusion,
    iso,
    karcher,
    linear,
    model_stock,
    moe_experts,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    tsv,
)
from mergesmith.methods.registry import METHODS, REQUIRED, MergeMethod, PerModel, get_method, merge_method

__all__ = ["METHODS", "REQUIRED", "MergeMethod", "PerModel", "get_method", "merge_method"]
