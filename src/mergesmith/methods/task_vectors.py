"""The task-vector family as one pipeline.

deltas -> sparsify each (its own density) -> weight -> optional sign consensus -> combine
-> normalise -> base + lambda * result. A method is this pipeline with a pruner (`sparsify.Pruner`)
and a consensus switch; new sparsifiers plug in as a `Pruner` made for input index i.

The engine may stream a tensor in row chunks (`methods.stream`): the method's observation is its
pruners (`Pruners`, declared with `observes=pruned(...)`), which the engine feeds every chunk
(thresholds, L1 norms); then it merges chunk by chunk with them. Everything after the pruners is
element-wise, so each chunk merges alone.

On the CPU the engine may give the inputs as raw values of the files (`kernels.Raw`, the raw lane):
then the compiled kernels form the deltas on the fly and the merging pass writes `Stream.out` in
the output's dtype, with the same float32 operations as the torch pipeline, bit for bit. Pruners
that cannot run there (`Pruner.fusable`) send the tensor to torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mergesmith import kernels
from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import Params
from mergesmith.methods.sparsify import Pruner, prune_whole
from mergesmith.methods.stream import Observation, Stream

PrunerFor = Callable[[int], Pruner]


class Pruners(Observation):
    """The task-vector family's observation of a tensor: one pruner per input (none without
    pruning), each fed its task vector: x_i - b (on raw values, formed by the kernels)."""

    def __init__(self, prune: PrunerFor | None, count: int) -> None:
        self.pruners = [prune(i) for i in range(count)] if prune is not None else []

    def setup(self, numel: int) -> None:
        super().setup(numel)
        for p in self.pruners:
            p.setup(numel)

    @property
    def needs_observe(self) -> bool:  # type: ignore[override]
        return any(p.needs_observe for p in self.pruners)

    @property
    def samples(self) -> bool:  # type: ignore[override]
        return bool(self.pruners)

    @property
    def streams(self) -> bool:  # type: ignore[override]
        return all(p.streams for p in self.pruners)

    @property
    def fusable(self) -> bool:  # type: ignore[override]
        return all(p.fusable for p in self.pruners)

    def sample(self, xs: list, base: torch.Tensor | kernels.Raw) -> None:
        for p, x in zip(self.pruners, xs, strict=True):
            p.sample(kernels.delta(x, base) if isinstance(base, kernels.Raw) else x.sub_(base))

    def feed(self, xs: list, base: torch.Tensor | kernels.Raw, at: Stream) -> None:
        for p, x in zip(self.pruners, xs, strict=True):
            if isinstance(base, kernels.Raw):
                p.observe_raw(x, base, at.cols, at.start)
            elif p.needs_observe:
                p.observe(x.sub_(base), at.start)

    def finish(self) -> bool:
        return all([p.finish() for p in self.pruners])

    def members(self) -> list[Observation]:
        return list(self.pruners)


def pruned(prune: Callable[[dict, object], PrunerFor | None]) -> Callable[[dict, object, int], Pruners]:
    """The `observes` of a task-vector method whose pruner of input i is `prune(args, rng)(i)`."""
    return lambda args, rng, count: Pruners(prune(args, rng), count)


def whole_if_rescaled(params: Params) -> str | None:
    """The magnitude pruners (`sparsify.Magnitude`, `Outliers`) keep the kept L1 norm with
    `rescale`: below density 1 that needs the threshold first, so whole tensors (`Pruner.streams`)."""
    if params.get("rescale") and any(d < 1 for d in params.get("density", (1.0,))):
        return "rescale: true with density < 1: the kept L1 norm needs the threshold first"
    return None


def _fused(deltas: Sequence[torch.Tensor]) -> bool:
    """Whether the compiled TIES merge can take these deltas (contiguous float32 on the CPU)."""
    return kernels.available() and all(
        d.device.type == "cpu" and d.dtype == torch.float32 and d.is_contiguous() for d in deltas
    )


def sign_consensus(weighted: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election by sum: per element the sign (+1/-1) of the summed weighted deltas (0 -> +1)."""
    total = weighted[0].clone()
    for d in weighted[1:]:
        total.add_(d)
    return total.sign_().add_(0.5).sign_()  # -1, 0, +1 -> -1, +1, +1 (three cheap passes, no `where`)


def merge_task_vectors(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    *,
    prune: PrunerFor | None,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    stream: Stream | None = None,
) -> torch.Tensor | None:
    """The merged tensor (or chunk, its pruners `stream.seen`); None for raw inputs (written to
    `stream.out`)."""
    if isinstance(base, kernels.Raw):
        assert stream is not None
        return _merge_raw(xs, base, weights, prune, consensus, normalize, lambda_, stream)
    if not xs:
        return base
    deltas = []
    for i, x in enumerate(xs):
        d = x.sub_(base)  # the inputs are ours to overwrite
        if prune is not None:
            d = prune_whole(prune(i), d) if stream is None else stream.seen.pruners[i].apply(d, stream.start)
        deltas.append(d.mul_(weights[i]))
    if consensus and _fused(deltas):  # the same float32 operations, one pass (`kernels.ties_combine`)
        combined = torch.from_numpy(
            kernels.ties_combine([d.numpy() for d in deltas], list(weights), normalize, _floor(weights))
        ).view(deltas[0].shape)
        return base.add_(combined, alpha=lambda_)
    if consensus:  # in place: the deltas become their agreeing parts
        elected = sign_consensus(deltas)
        divisor = torch.zeros_like(base) if normalize else None
        for d, w in zip(deltas, weights, strict=True):
            d.mul_(elected).clamp_(min=0)  # d * s > 0 where sign(d) == elected (0 never agrees): d <- s max(d s, 0)
            if divisor is not None:
                divisor.add_(torch.sign(d), alpha=w)  # sign: 1 where it agrees, else 0
            d.mul_(elected)
        combined = deltas[0]
        for d in deltas[1:]:
            combined.add_(d)
        if divisor is not None:
            if _floor(weights) > 0:
                divisor.clamp_(min=_floor(weights))
            else:
                divisor.masked_fill_(divisor == 0, 1.0)
    else:
        combined = deltas[0]
        for d in deltas[1:]:
            combined.add_(d)
        divisor = torch.tensor(_sum_divisor(weights), dtype=base.dtype, device=base.device)
    if normalize:
        combined.div_(divisor)
    return base.add_(combined, alpha=lambda_)


def _floor(weights: Sequence[float]) -> float:
    """TIES' normalising divisors are raised to this (half the smallest weight) when it is positive;
    a zero divisor means nothing agreed (the sum is 0 there): any floor works. Else zeros become 1."""
    return min(weights) / 2 if min(weights) > 0 else 0.0


def _sum_divisor(weights: Sequence[float]) -> float:
    """The divisor of a normalised plain sum: the weights' sum (1 where it is ~0)."""
    z = float(sum(weights))
    return 1.0 if abs(z) < 1e-8 else z


def _merge_raw(
    xs: list[kernels.Raw],
    base: kernels.Raw,
    weights: Sequence[float],
    prune: PrunerFor | None,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    stream: Stream,
) -> None:
    """`merge_task_vectors` on raw values: one `kernels.task_merge` call with each pruner's rule for
    the chunk (the pruners observed it through the kernels: `Pruners.feed`)."""
    pruners = stream.seen.pruners if prune is not None else [Pruner() for _ in xs]
    assert stream.out is not None
    rules = [p.rule(stream.start, w) for p, w in zip(pruners, weights, strict=True)]
    kernels.task_merge(
        stream.out,
        xs,
        base,
        rules,
        consensus=consensus,
        normalize=normalize,
        floor=_floor(weights),
        divisor=_sum_divisor(weights),
        lambda_=lambda_,
    )
    return None
