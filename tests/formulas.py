"""Reference formulas in float64, written from the SPEC independently of mergesmith's code."""

from __future__ import annotations

import math

import torch


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def gradient(values: list[float], t: float) -> float:
    k = len(values)
    s = t * (k - 1)
    i = min(int(math.floor(s)), k - 1)
    j = min(k - 1, i + 1)
    return (1 - (s - i)) * values[i] + (s - i) * values[j]


def linear(xs, ws, normalize=True):
    y = sum(w * f64(x) for x, w in zip(xs, ws, strict=True))
    return y / sum(ws) if normalize else y


def slerp(t, v0, v1):
    a, b = f64(v0).flatten(), f64(v1).flatten()
    ua = a / a.norm() if a.norm() > 1e-8 else a
    ub = b / b.norm() if b.norm() > 1e-8 else b
    d = float(ua @ ub)
    if abs(d) > 0.9995:
        y = (1 - t) * a + t * b
    else:
        th = math.acos(d)
        y = (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)
    return y.reshape(v0.shape)


def topk_keep(delta, density):
    """Magnitude pruning by sorting (ties irrelevant for continuous random data)."""
    flat = delta.flatten()
    k = int(density * flat.numel())
    keep = torch.zeros_like(flat)
    if k > 0:
        idx = torch.argsort(flat.abs(), descending=True)[:k]
        keep[idx] = 1
    return (flat * keep).reshape(delta.shape)


def task_vectors(base, xs, ws, densities, *, consensus, normalize, lam=1.0, masks=None, rescale=False):
    """TIES/task arithmetic; `masks` (0/1 per model) replaces magnitude pruning (DARE)."""
    b = f64(base)
    ds = []
    for i, x in enumerate(xs):
        d = f64(x.float() - base.float())  # the delta as float32 arithmetic gives it
        kept = d * masks[i] if masks is not None else topk_keep(d, densities[i]) if densities[i] < 1 else d
        if rescale and kept.abs().sum() > 1e-7 and d.abs().sum() > 1e-7:
            kept = kept * (d.abs().sum() / kept.abs().sum())
        ds.append(kept * ws[i])
    if consensus:
        total = sum(ds)
        sign = torch.where(total >= 0, 1.0, -1.0).double()
        agree = [(torch.sign(d) == sign).double() for d in ds]
        delta = sum(a * d for a, d in zip(agree, ds, strict=True))
        z = sum(a * w for a, w in zip(agree, ws, strict=True))
        z = torch.where(z == 0, torch.ones_like(z), z)
    else:
        delta = sum(ds)
        z = sum(ws)
        z = 1.0 if abs(z) < 1e-8 else z
    if normalize:
        delta = delta / z
    return b + lam * delta
