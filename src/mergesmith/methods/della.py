"""della, della_linear: drop task-vector elements at random, less often the larger they are (MAGPRUNE)."""

from __future__ import annotations

from mergesmith.lazy_torch import torch
from mergesmith.methods import sparsify
from mergesmith.methods.registry import REQUIRED, PerModel, merge_method
from mergesmith.methods.stream import Stream
from mergesmith.methods.task_arithmetic import STORAGE_ONLY
from mergesmith.methods.task_vectors import merge_task_vectors, pruned
from mergesmith.rng import TensorRNG

DELLA_PAPER = "https://arxiv.org/abs/2406.11617"


@merge_method(
    "della",
    base="required",
    models=(0, None),  # only the base (a base+LoRA alone, "lorablation"): the output is the base, as in mergekit
    summary="DELLA: magnitude-ranked random drop per row, L1 rescale, TIES sign consensus.",
    paper=DELLA_PAPER,
    pretty="DELLA",
    storage_only=STORAGE_ONLY,
    observes=pruned(lambda a, rng: lambda i: sparsify.MagPrune(a["density"][i], a["epsilon"][i], rng, i, a["rescale"])),
)
def della(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel = REQUIRED,
    density: PerModel = 1.0,
    epsilon: PerModel = 0.15,
    normalize: bool = True,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    rng: TensorRNG,
    stream: Stream | None = None,
) -> torch.Tensor:
    """Keep delta_i elements with p = density - eps + 2 eps rank/(n-1) (rank of |delta| in its row);
    D_i = w_i delta~_i, sigma = sign(sum_i D_i); y = b + lambda * sum_i M_i D_i / sum_i M_i w_i."""
    return merge_task_vectors(
        xs,
        base,
        weight,
        normalize=normalize,
        lambda_=lambda_,
        consensus=True,
        prune=lambda i: sparsify.MagPrune(density[i], epsilon[i], rng, i, rescale),
        stream=stream,
    )


@merge_method(
    "della_linear",
    base="required",
    models=(0, None),  # only the base (a base+LoRA alone, "lorablation"): the output is the base, as in mergekit
    summary="DELLA sparsification without sign consensus: task arithmetic on MAGPRUNE-dropped deltas.",
    paper=DELLA_PAPER,
    pretty="Linear DELLA",
    storage_only=STORAGE_ONLY,
    observes=pruned(lambda a, rng: lambda i: sparsify.MagPrune(a["density"][i], a["epsilon"][i], rng, i, a["rescale"])),
)
def della_linear(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel = REQUIRED,
    density: PerModel = 1.0,
    epsilon: PerModel = 0.15,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    rng: TensorRNG,
    stream: Stream | None = None,
) -> torch.Tensor:
    """DELLA sparsification, then y = b + lambda * sum_i w_i delta~_i [/ sum_i w_i if normalize]."""
    return merge_task_vectors(
        xs,
        base,
        weight,
        normalize=normalize,
        lambda_=lambda_,
        consensus=False,
        prune=lambda i: sparsify.MagPrune(density[i], epsilon[i], rng, i, rescale),
        stream=stream,
    )
