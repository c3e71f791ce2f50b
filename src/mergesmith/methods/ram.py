"""ram, ramplus_tl: average task vectors only where several models change a weight; keep unique changes.

ram is element-wise (the engine merges it in row chunks). ramplus_tl needs, per model, two counts
over the whole tensor; streamed, they are observed over the row chunks first (`Overlap`), in the raw
lane by compiled kernels over the files' values (`kernels.ram_overlap`, `kernels.ramplus`)."""

from __future__ import annotations

from mergesmith import kernels
from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import merge_method
from mergesmith.methods.stream import Observation, Stream

RAM_PAPER = "https://arxiv.org/abs/2601.13572"


def _active(xs: list[torch.Tensor], base: torch.Tensor, epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Task vectors zeroed where |tau| <= epsilon, and the count of active models per element."""
    deltas = [x.sub_(base) for x in xs]
    count = torch.zeros_like(base)
    for d in deltas:
        active = d.abs() > epsilon
        d.mul_(active)
        count.add_(active)
    return deltas, count


class Overlap(Observation):
    """Per model: how many of its active elements other models change too, and how many only it
    changes. Exact integer counts per chunk (chunks may be observed on several threads), added up
    by `finish`, so any chunking gives the whole tensor's."""

    needs_observe = True

    def __init__(self, epsilon: float) -> None:
        self.epsilon = epsilon
        self.chunks: dict[int, list[tuple[int, int]]] = {}  # chunk start -> per model (shared, unique)
        self.shared: list[int] = []
        self.unique: list[int] = []

    def count(self, deltas: list[torch.Tensor], count: torch.Tensor, start: int) -> None:
        unique, shared = count == 1, count > 1
        actives = [d != 0 for d in deltas]
        self.chunks[start] = [(int((a & shared).sum()), int((a & unique).sum())) for a in actives]

    @property
    def fusable(self) -> bool:  # type: ignore[override]
        return kernels.has_ram()

    def feed(self, xs: list, base: torch.Tensor | kernels.Raw, at: Stream) -> None:
        if isinstance(base, kernels.Raw):
            self.chunks[at.start] = kernels.ram_overlap(xs, base, self.epsilon)
        else:
            self.count(*_active(xs, base, self.epsilon), at.start)

    def finish(self) -> bool:
        per_model = list(zip(*self.chunks.values(), strict=True))
        self.shared = [sum(s for s, _ in m) for m in per_model]
        self.unique = [sum(u for _, u in m) for m in per_model]
        self.chunks = {}
        return True


@merge_method(
    "ram",
    base="required",
    summary="RAM: mean of the task vectors that change each weight; a change made by one model is kept whole.",
    paper=RAM_PAPER,
    pretty="Reinforced Agent Merging",
    elementwise=True,
)
def ram(xs: list[torch.Tensor], base: torch.Tensor, *, epsilon: float = 1e-5) -> torch.Tensor:
    """a_i = |tau_i| > epsilon, c = sum_i a_i; y = b + sum_i a_i tau_i / max(c, 1)."""
    if not xs:
        return base
    deltas, count = _active(xs, base, epsilon)
    merged = deltas[0]
    for d in deltas[1:]:
        merged.add_(d)
    return base.add_(merged.div_(count.clamp_min_(1)))


@merge_method(
    "ramplus_tl",
    base="required",
    summary="RAM+ (tensor-local): RAM with each model's unique changes amplified by its share of overlap.",
    paper=RAM_PAPER,
    pretty="Reinforced Agent Merging Plus (Tensor-Local)",
    observes=lambda args, rng, count: Overlap(args["epsilon"]) if count else None,
)
def ramplus_tl(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
    stream: Stream | None = None,
) -> torch.Tensor | None:
    """As ram, but where only model i is active its tau_i is scaled by 1 + r clamp(rho_i, 0, alpha),
    rho_i = #(a_i and c > 1) / max(#(a_i and c = 1), epsilon), counted over the tensor."""
    if not xs:
        return base
    if isinstance(base, kernels.Raw):  # the raw lane: the observed counts, one pass into `stream.out`
        assert stream is not None and stream.out is not None
        kernels.ramplus(
            stream.out, xs, base, epsilon, [_boost(stream.seen, i, r, alpha, epsilon) for i in range(len(xs))]
        )
        return None
    deltas, count = _active(xs, base, epsilon)
    if stream is None:
        overlap = Overlap(epsilon)
        overlap.count(deltas, count, 0)
        overlap.finish()
    else:
        overlap = stream.seen
    unique = count == 1
    shared = count > 1
    shared_share = shared / count.clamp_min(1)  # 1/c where c > 1, else 0
    merged = torch.zeros_like(base)
    for i, d in enumerate(deltas):
        boost = _boost(overlap, i, r, alpha, epsilon)
        merged.addcmul_(d, unique.to(d.dtype).mul_(boost).add_(shared_share))
    return base.add_(merged)


def _boost(overlap: Overlap, i: int, r: float, alpha: float, epsilon: float) -> float:
    """1 + r clamp(rho_i, 0, alpha): the scale of model i's unique changes."""
    rho = overlap.shared[i] / max(overlap.unique[i], epsilon)
    return 1 + r * min(max(rho, 0.0), alpha)
