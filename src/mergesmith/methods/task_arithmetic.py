"""task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs(_ties), della(_linear):
the task-vector pipeline with different sparsifiers and consensus."""

from __future__ import annotations

from mergesmith.lazy_torch import torch
from mergesmith.methods import sparsify
from mergesmith.methods.registry import REQUIRED, PerModel, merge_method
from mergesmith.methods.stream import Stream
from mergesmith.methods.task_vectors import merge_task_vectors, pruned, whole_if_rescaled
from mergesmith.rng import TensorRNG

TIES_PAPER = "https://arxiv.org/abs/2306.01708"
DARE_PAPER = "https://arxiv.org/abs/2311.03099"
#: Declared by mergekit's task-vector methods to save memory; changes no value here (recipe/leniency.py notes it).
STORAGE_ONLY = {"int8_mask": "mergekit's int8 storage for masks; masks never use much memory here"}


@merge_method(
    "task_arithmetic",
    base="required",
    models=(0, None),  # only the base (a base+LoRA alone, "lorablation"): the output is the base, as in mergekit
    summary="Add weighted task vectors (fine-tune minus base) to the base.",
    paper="https://arxiv.org/abs/2212.04089",
    pretty="Task Arithmetic",
    inert={
        "density": "task_arithmetic never sparsifies (as in mergekit); use ties, dare_linear or breadcrumbs to prune"
    },
    elementwise=lambda params: all(d >= 1 for d in params.get("density", (1.0,))),
    storage_only=STORAGE_ONLY,
    observes=pruned(lambda a, rng: None),
)
def task_arithmetic(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel = REQUIRED,
    density: PerModel = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    stream: Stream | None = None,
) -> torch.Tensor:
    """y = b + lambda * sum_i w_i (x_i - b) [/ sum_i w_i if normalize]. `density` is accepted and ignored:
    mergekit declares it and never applies it, so recipes that set it get mergekit's tensors."""
    return merge_task_vectors(
        xs,
        base,
        weight,
        normalize=normalize,
        lambda_=lambda_,
        consensus=False,
        prune=None,
        stream=stream,
    )


@merge_method(
    "ties",
    base="required",
    models=(0, None),  # only the base (a base+LoRA alone, "lorablation"): the output is the base, as in mergekit
    summary="TIES: trim task vectors by magnitude, elect signs, disjoint mean.",
    paper=TIES_PAPER,
    pretty="TIES",
    whole_when=whole_if_rescaled,
    storage_only=STORAGE_ONLY,
    observes=pruned(lambda a, rng: lambda i: sparsify.Magnitude(a["density"][i], a["rescale"])),
)
def ties(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel = REQUIRED,
    density: PerModel = 1.0,
    normalize: bool = True,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    stream: Stream | None = None,
) -> torch.Tensor:
    """D_i = w_i * topk(x_i - b, density_i); sigma = sign(sum_i D_i);
    y = b + lambda * sum_i [sign D_i = sigma] D_i / sum_i [sign D_i = sigma] w_i."""
    return merge_task_vectors(
        xs,
        base,
        weight,
        normalize=normalize,
        lambda_=lambda_,
        consensus=True,
        prune=lambda i: sparsify.Magnitude(density[i], rescale),
        stream=stream,
    )


@merge_method(
    "dare_linear",
    base="required",
    models=(0, None),  # only the base (a base+LoRA alone, "lorablation"): the output is the base, as in mergekit
    summary="DARE: drop delta elements at random, rescale, add.",
    paper=DARE_PAPER,
    pretty="DARE",
    storage_only=STORAGE_ONLY,
    observes=pruned(lambda a, rng: lambda i: sparsify.Random(a["density"][i], rng, i, a["rescale"])),
)
def dare_linear(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel = REQUIRED,
    density: PerModel = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    rng: TensorRNG,
    stream: Stream | None = None,
) -> torch.Tensor:
    """Keep each element of x_i - b with probability density_i, L1-rescale, then task arithmetic."""
    return merge_task_vectors(
        xs,
        base,
        weight,
        normalize=normalize,
        lambda_=lambda_,
        consensus=False,
        prune=lambda i: sparsify.Random(density[i], rng, i, rescale),
        stream=stream,
    )


@merge_method(
    "dare_ties",
    base="required",
    models=(0, None),  # only the base (a base+LoRA alone, "lorablation"): the output is the base, as in mergekit
    summary="DARE random drop with TIES sign consensus.",
    paper=DARE_PAPER,
    pretty="DARE TIES",
    storage_only=STORAGE_ONLY,
    observes=pruned(lambda a, rng: lambda i: sparsify.Random(a["density"][i], rng, i, a["rescale"])),
)
def dare_ties(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel = REQUIRED,
    density: PerModel = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    rng: TensorRNG,
    stream: Stream | None = None,
) -> torch.Tensor:
    """DARE sparsification, then TIES sign election and disjoint merge."""
    return merge_task_vectors(
        xs,
        base,
        weight,
        normalize=normalize,
        lambda_=lambda_,
        consensus=True,
        prune=lambda i: sparsify.Random(density[i], rng, i, rescale),
        stream=stream,
    )
