"""breadcrumbs, breadcrumbs_ties: task vectors without their largest outliers and their small noise."""

from __future__ import annotations

from mergesmith.lazy_torch import torch
from mergesmith.methods import sparsify
from mergesmith.methods.registry import REQUIRED, PerModel, merge_method
from mergesmith.methods.stream import Stream
from mergesmith.methods.task_arithmetic import STORAGE_ONLY
from mergesmith.methods.task_vectors import merge_task_vectors, pruned, whole_if_rescaled

BREADCRUMBS_PAPER = "https://arxiv.org/abs/2312.06795"


@merge_method(
    "breadcrumbs",
    base="required",
    models=(0, None),  # only the base (a base+LoRA alone, "lorablation"): the output is the base, as in mergekit
    summary="Model Breadcrumbs: drop each task vector's largest (gamma) and smallest magnitudes, then add.",
    paper=BREADCRUMBS_PAPER,
    pretty="Model Breadcrumbs",
    whole_when=whole_if_rescaled,
    storage_only=STORAGE_ONLY,
    observes=pruned(lambda a, rng: lambda i: sparsify.Outliers(a["density"][i], a["gamma"][i], a["rescale"])),
)
def breadcrumbs(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel = REQUIRED,
    density: PerModel = 1.0,
    gamma: PerModel = 0.01,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    stream: Stream | None = None,
) -> torch.Tensor:
    """Of n = numel elements of x_i - b keep floor(density_i n), dropping the floor(gamma_i n) largest |delta|
    and the smallest; y = b + lambda * sum_i w_i delta~_i [/ sum_i w_i if normalize]."""
    return merge_task_vectors(
        xs,
        base,
        weight,
        normalize=normalize,
        lambda_=lambda_,
        consensus=False,
        prune=lambda i: sparsify.Outliers(density[i], gamma[i], rescale),
        stream=stream,
    )


@merge_method(
    "breadcrumbs_ties",
    base="required",
    models=(0, None),  # only the base (a base+LoRA alone, "lorablation"): the output is the base, as in mergekit
    summary="Model Breadcrumbs sparsification with TIES sign consensus.",
    paper=BREADCRUMBS_PAPER,
    pretty="Model Breadcrumbs with TIES",
    whole_when=whole_if_rescaled,
    storage_only=STORAGE_ONLY,
    observes=pruned(lambda a, rng: lambda i: sparsify.Outliers(a["density"][i], a["gamma"][i], a["rescale"])),
)
def breadcrumbs_ties(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel = REQUIRED,
    density: PerModel = 1.0,
    gamma: PerModel = 0.01,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    stream: Stream | None = None,
) -> torch.Tensor:
    """Breadcrumbs sparsification, D_i = w_i delta~_i, sigma = sign(sum_i D_i);
    y = b + lambda * sum_i [sign D_i = sigma] D_i [/ sum_i [sign D_i = sigma] w_i if normalize]."""
    return merge_task_vectors(
        xs,
        base,
        weight,
        normalize=normalize,
        lambda_=lambda_,
        consensus=True,
        prune=lambda i: sparsify.Outliers(density[i], gamma[i], rescale),
        stream=stream,
    )
