"""The task-vector family, declared once: task_arithmetic, ties, dare_linear, dare_ties,
breadcrumbs, breadcrumbs_ties, della, della_linear.

Every member is the one pipeline of `task_vectors.merge_task_vectors` with its own pruner and
consensus switch, and the same parameters (weight, density, normalize, rescale, lambda, int8_mask,
plus gamma or epsilon), differing only in defaults. So each is a row of `FAMILY` (name, pruner,
consensus, defaults, formula, paper) and `declare` writes its signature: the registry still reads
the parameters, types and defaults from that signature, so `mergesmith methods ties`, validation,
leniency and search genes see each method exactly as if it were written out by hand.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mergesmith.methods import sparsify
from mergesmith.methods.registry import REQUIRED, Params, PerModel, merge_method
from mergesmith.methods.task_vectors import PrunerFor, merge_task_vectors, pruned, whole_if_rescaled
from mergesmith.rng import TensorRNG

TIES_PAPER = "https://arxiv.org/abs/2306.01708"
DARE_PAPER = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_PAPER = "https://arxiv.org/abs/2312.06795"
DELLA_PAPER = "https://arxiv.org/abs/2406.11617"
#: Declared by mergekit's task-vector methods to save memory; changes no value here (recipe/leniency.py notes it).
STORAGE_ONLY = {"int8_mask": "mergekit's int8 storage for masks; masks never use much memory here"}

#: A member's pruner of input i, from its arguments (argument names: `lambda_`) and RNG; None: no pruning.
Prune = Callable[[dict[str, Any], TensorRNG | None], PrunerFor | None]


@dataclass(frozen=True)
class Member:
    """One task-vector method: what sets it apart from the others."""

    name: str
    summary: str
    paper: str
    pretty: str
    formula: str  # shown by `mergesmith methods NAME`
    prune: Prune
    consensus: bool  # TIES' sign election and disjoint sum, or the plain weighted sum
    normalize: bool = False
    rescale: bool = False
    extra: tuple[tuple[str, float], ...] = ()  # per-model parameters after density, with defaults
    random: bool = False  # its pruner draws from the tensor's RNG
    whole_when: Callable[[Params], str | None] | None = None
    elementwise: Callable[[Params], bool] | None = None
    inert: dict[str, str] = field(default_factory=dict)


def _signature(m: Member) -> inspect.Signature:
    """The signature a hand-written member would have: the registry reads the recipe parameters from it."""
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("xs", positional),
        inspect.Parameter("base", positional),
        inspect.Parameter("weight", keyword, default=REQUIRED, annotation=PerModel),
        inspect.Parameter("density", keyword, default=1.0, annotation=PerModel),
        *(inspect.Parameter(name, keyword, default=d, annotation=PerModel) for name, d in m.extra),
        inspect.Parameter("normalize", keyword, default=m.normalize, annotation=bool),
        inspect.Parameter("rescale", keyword, default=m.rescale, annotation=bool),
        inspect.Parameter("lambda_", keyword, default=1.0, annotation=float),
        inspect.Parameter("int8_mask", keyword, default=False, annotation=bool),
    ]
    if m.random:
        params.append(inspect.Parameter("rng", keyword))
    params.append(inspect.Parameter("stream", keyword, default=None))
    return inspect.Signature(params)


def declare(m: Member) -> Callable[..., Any]:
    """Register member `m` as a merge method; returns its function."""
    signature = _signature(m)
    defaults = {p.name: p.default for p in signature.parameters.values() if p.default is not inspect.Parameter.empty}

    def merge(xs: list, base: Any, *, rng: TensorRNG | None = None, stream: Any = None, **given: Any) -> Any:
        args = {**defaults, **given}
        return merge_task_vectors(
            xs,
            base,
            args["weight"],
            normalize=args["normalize"],
            lambda_=args["lambda_"],
            consensus=m.consensus,
            prune=m.prune(args, rng),
            stream=stream,
        )

    merge.__name__ = merge.__qualname__ = m.name
    merge.__doc__ = m.formula
    merge.__signature__ = signature  # type: ignore[attr-defined]
    return merge_method(
        m.name,
        base="required",
        models=(0, None),  # only the base (a base+LoRA alone, "lorablation"): the output is the base, as in mergekit
        summary=m.summary,
        paper=m.paper,
        pretty=m.pretty,
        inert=m.inert,
        elementwise=m.elementwise or False,
        whole_when=m.whole_when,
        storage_only=STORAGE_ONLY,
        observes=pruned(m.prune),
    )(merge)


def _magnitude(a: dict[str, Any], rng: TensorRNG | None) -> PrunerFor:
    return lambda i: sparsify.Magnitude(a["density"][i], a["rescale"])


def _random(a: dict[str, Any], rng: TensorRNG | None) -> PrunerFor:
    return lambda i: sparsify.Random(a["density"][i], rng, i, a["rescale"])


def _outliers(a: dict[str, Any], rng: TensorRNG | None) -> PrunerFor:
    return lambda i: sparsify.Outliers(a["density"][i], a["gamma"][i], a["rescale"])


def _magprune(a: dict[str, Any], rng: TensorRNG | None) -> PrunerFor:
    return lambda i: sparsify.MagPrune(a["density"][i], a["epsilon"][i], rng, i, a["rescale"])


FAMILY = (
    Member(
        "task_arithmetic",
        summary="Add weighted task vectors (fine-tune minus base) to the base.",
        paper="https://arxiv.org/abs/2212.04089",
        pretty="Task Arithmetic",
        formula="y = b + lambda * sum_i w_i (x_i - b) [/ sum_i w_i if normalize]. `density` is accepted and"
        " ignored:\nmergekit declares it and never applies it, so recipes that set it get mergekit's tensors.",
        prune=lambda a, rng: None,
        consensus=False,
        elementwise=lambda params: all(d >= 1 for d in params.get("density", (1.0,))),
        inert={
            "density": "task_arithmetic never sparsifies (as in mergekit); use ties, dare_linear or breadcrumbs to prune"
        },
    ),
    Member(
        "ties",
        summary="TIES: trim task vectors by magnitude, elect signs, disjoint mean.",
        paper=TIES_PAPER,
        pretty="TIES",
        formula="D_i = w_i * topk(x_i - b, density_i); sigma = sign(sum_i D_i);\n"
        "y = b + lambda * sum_i [sign D_i = sigma] D_i / sum_i [sign D_i = sigma] w_i.",
        prune=_magnitude,
        consensus=True,
        normalize=True,
        whole_when=whole_if_rescaled,
    ),
    Member(
        "dare_linear",
        summary="DARE: drop delta elements at random, rescale, add.",
        paper=DARE_PAPER,
        pretty="DARE",
        formula="Keep each element of x_i - b with probability density_i, L1-rescale, then task arithmetic.",
        prune=_random,
        consensus=False,
        rescale=True,
        random=True,
    ),
    Member(
        "dare_ties",
        summary="DARE random drop with TIES sign consensus.",
        paper=DARE_PAPER,
        pretty="DARE TIES",
        formula="DARE sparsification, then TIES sign election and disjoint merge.",
        prune=_random,
        consensus=True,
        rescale=True,
        random=True,
    ),
    Member(
        "breadcrumbs",
        summary="Model Breadcrumbs: drop each task vector's largest (gamma) and smallest magnitudes, then add.",
        paper=BREADCRUMBS_PAPER,
        pretty="Model Breadcrumbs",
        formula="Of n = numel elements of x_i - b keep floor(density_i n), dropping the floor(gamma_i n) largest"
        " |delta|\nand the smallest; y = b + lambda * sum_i w_i delta~_i [/ sum_i w_i if normalize].",
        prune=_outliers,
        consensus=False,
        extra=(("gamma", 0.01),),
        whole_when=whole_if_rescaled,
    ),
    Member(
        "breadcrumbs_ties",
        summary="Model Breadcrumbs sparsification with TIES sign consensus.",
        paper=BREADCRUMBS_PAPER,
        pretty="Model Breadcrumbs with TIES",
        formula="Breadcrumbs sparsification, D_i = w_i delta~_i, sigma = sign(sum_i D_i);\n"
        "y = b + lambda * sum_i [sign D_i = sigma] D_i [/ sum_i [sign D_i = sigma] w_i if normalize].",
        prune=_outliers,
        consensus=True,
        extra=(("gamma", 0.01),),
        whole_when=whole_if_rescaled,
    ),
    Member(
        "della",
        summary="DELLA: magnitude-ranked random drop per row, L1 rescale, TIES sign consensus.",
        paper=DELLA_PAPER,
        pretty="DELLA",
        formula="Keep delta_i elements with p = density - eps + 2 eps rank/(n-1) (rank of |delta| in its row);\n"
        "D_i = w_i delta~_i, sigma = sign(sum_i D_i); y = b + lambda * sum_i M_i D_i / sum_i M_i w_i.",
        prune=_magprune,
        consensus=True,
        normalize=True,
        rescale=True,
        extra=(("epsilon", 0.15),),
        random=True,
    ),
    Member(
        "della_linear",
        summary="DELLA sparsification without sign consensus: task arithmetic on MAGPRUNE-dropped deltas.",
        paper=DELLA_PAPER,
        pretty="Linear DELLA",
        formula="DELLA sparsification, then y = b + lambda * sum_i w_i delta~_i [/ sum_i w_i if normalize].",
        prune=_magprune,
        consensus=False,
        rescale=True,
        extra=(("epsilon", 0.15),),
        random=True,
    ),
)

for _member in FAMILY:
    declare(_member)
