"""Seeded randomness keyed by (seed, tensor name, stream), independent of processing order.

Every random draw of a merge comes from a counter-based stream (`mergesmith.kernels`: SplitMix64's
finaliser over key + counter * gamma) whose 64-bit key is a hash of the seed, the output tensor's
name and a stream number (the input model's index). So a seeded merge is bit-identical on every
rerun, whatever order tensors are processed in and however they are chunked, and the same mask is
drawn whether the maths runs on the CPU or a GPU (drawn on the CPU, moved to the device).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from mergesmith import kernels
from mergesmith.dtypes import numel
from mergesmith.lazy_torch import torch


class TensorRNG:
    """Random draws for one output tensor. `streams` names the inputs (model references), so
    input i's draws depend on which model it is, not on its position in the recipe."""

    def __init__(self, seed: int, key: str, streams: tuple[str, ...] = ()) -> None:
        self.seed = seed
        self.key = key
        self.streams = streams

    def stream_key(self, stream: int) -> int:
        """The 64-bit key of stream `stream`'s words (`kernels`)."""
        label = self.streams[stream] if stream < len(self.streams) else str(stream)
        digest = hashlib.blake2b(f"{self.seed}\0{self.key}\0{label}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def uniform(
        self, shape: torch.Size | tuple[int, ...], stream: int, device: torch.device | None = None, start: int = 0
    ) -> torch.Tensor:
        """Float32 uniform draws in [0, 1) for `shape` (from draw `start` on): (u >> 8) * 2**-24 of the
        raw words u."""
        values = kernels.uniform(self.stream_key(stream), start, numel(shape))
        out = torch.from_numpy(values).view(tuple(shape))
        return out if device is None or device.type == "cpu" else out.to(device, non_blocking=True)

    def normal(
        self, shape: torch.Size | tuple[int, ...], stream: int, device: torch.device | None = None, start: int = 0
    ) -> torch.Tensor:
        """Float32 standard normal draws for `shape`, value p (from `start` on) made by Box-Muller from
        the uniform draws 2p and 2p + 1: sqrt(-2 ln(1 - u)) * cos(2 pi v). Value p depends on p only, so
        a tensor drawn in parts (at offsets) gets the same values as drawn whole."""
        n = numel(shape)
        u = torch.from_numpy(kernels.uniform(self.stream_key(stream), 2 * start, 2 * n)).view(n, 2)
        out = torch.sqrt(torch.log1p(-u[:, 0]).mul_(-2.0)).mul_(torch.cos(u[:, 1].mul(2 * math.pi)))
        out = out.view(tuple(shape))
        return out if device is None or device.type == "cpu" else out.to(device, non_blocking=True)

    @staticmethod
    def word_cut(p: float) -> int:
        """`uniform < p` as an integer test on the raw words u, u < the bound returned: uniform is
        (u >> 8) * 2**-24, so the bound is ceil(p * 2**24) << 8 with p rounded to float32; 0 keeps
        none, 2**32 every one."""
        cut = math.ceil(float(np.float32(p)) * 2**24)
        return 0 if cut <= 0 else 1 << 32 if cut >= 2**24 else cut << 8

    def keep_mask(
        self,
        shape: torch.Size | tuple[int, ...],
        p: float | torch.Tensor,
        stream: int,
        device: torch.device | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Boolean mask keeping each element with probability `p` (a float or a broadcastable tensor)."""
        if isinstance(p, torch.Tensor):
            return self.uniform(shape, stream, device, start) < p
        cut = self.word_cut(p)
        if cut in (0, 1 << 32):
            out = torch.full(tuple(shape), cut > 0, dtype=torch.bool)
        else:
            out = torch.from_numpy(kernels.keep_mask(self.stream_key(stream), start, numel(shape), cut))
            out = out.view(tuple(shape))
        return out if device is None or device.type == "cpu" else out.to(device, non_blocking=True)

    def keep_apply(self, x: torch.Tensor, p: float, stream: int, start: int = 0) -> torch.Tensor:
        """`x.mul_(keep_mask(x.shape, p, stream, start=start))`, fused where `x` is a contiguous float32
        CPU tensor (no mask is made: 0.4 ns per value against 4.4 ns)."""
        cut = self.word_cut(p)
        if 0 < cut < 1 << 32 and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous():
            kernels.keep_apply(x.numpy(), self.stream_key(stream), start, cut)
            return x
        return x.mul_(self.keep_mask(x.shape, p, stream, x.device, start))

    def keep_apply_l1(self, rows: torch.Tensor, p: float, stream: int, start: int = 0) -> tuple[list, list]:
        """`keep_apply` on a contiguous float32 CPU matrix, returning its per-row L1 norms (as
        `kernels.row_l1` sums them) before and after, in one pass over each row."""
        cut = self.word_cut(p)
        if 0 < cut < 1 << 32:
            before, after = kernels.keep_apply_l1(rows.numpy(), self.stream_key(stream), start, cut)
            return before.tolist(), after.tolist()
        before = kernels.row_l1(rows.numpy()).tolist()
        self.keep_apply(rows, p, stream, start)
        return before, kernels.row_l1(rows.numpy()).tolist()
