"""Seeded randomness keyed by (seed, tensor name, stream), independent of processing order.

Every random draw of a merge comes from a counter-based generator (NumPy's Philox) whose key is a
hash of the seed, the output tensor's name and a stream number (the input model's index). So a
seeded merge is bit-identical on every rerun, whatever order tensors are processed in, and the
same mask is drawn whether the maths runs on the CPU or a GPU.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch


class TensorRNG:
    """Random draws for one output tensor. `streams` names the inputs (model references), so
    input i's draws depend on which model it is, not on its position in the recipe."""

    def __init__(self, seed: int, key: str, streams: tuple[str, ...] = ()) -> None:
        self.seed = seed
        self.key = key
        self.streams = streams

    def _generator(self, stream: int) -> np.random.Generator:
        label = self.streams[stream] if stream < len(self.streams) else str(stream)
        digest = hashlib.blake2b(f"{self.seed}\0{self.key}\0{label}".encode(), digest_size=16).digest()
        key = np.frombuffer(digest, dtype=np.uint64)
        return np.random.Generator(np.random.Philox(key=key))

    def words(self, start: int, count: int, stream: int) -> np.ndarray:
        """Raw 32-bit words `start` .. `start + count` of a stream: the generator is positioned with
        Philox's `advance` (4 64-bit words, 8 of ours, per step), so any chunk of a tensor's draws
        costs only its own length, and chunked draws equal whole ones."""
        gen = self._generator(stream).bit_generator
        gen.advance(start // 8)
        skip = start % 8
        return gen.random_raw((skip + count + 1) // 2).view(np.uint32)[skip : skip + count]

    def uniform(
        self, shape: torch.Size | tuple[int, ...], stream: int, device: torch.device | None = None, start: int = 0
    ) -> torch.Tensor:
        """Float32 uniform draws in [0, 1) for `shape` (from draw `start` on): NumPy's
        `random(dtype=float32)`, (u >> 8) * 2**-24 of the raw words u."""
        n = 1
        for s in shape:
            n *= s
        values = (self.words(start, n, stream) >> np.uint32(8)).astype(np.float32) * np.float32(2**-24)
        out = torch.from_numpy(values).view(tuple(shape))
        return out if device is None or device.type == "cpu" else out.to(device, non_blocking=True)

    def keep_mask(
        self,
        shape: torch.Size | tuple[int, ...],
        p: float | torch.Tensor,
        stream: int,
        device: torch.device | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Boolean mask keeping each element with probability `p` (a float or a broadcastable tensor).

        For a float `p` the draws are compared as integers: uniform() returns (u >> 8) * 2**-24 for
        the generator's raw 32-bit words u, so `uniform < p` is `u < ceil(p * 2**24) << 8` with p
        rounded to float32: the same mask, without the float conversion pass.
        """
        if isinstance(p, torch.Tensor):
            return self.uniform(shape, stream, device, start) < p
        n = 1
        for s in shape:
            n *= s
        cut = math.ceil(float(np.float32(p)) * 2**24)
        if cut <= 0 or cut >= 2**24:
            out = torch.full(tuple(shape), cut > 0, dtype=torch.bool)
        else:
            out = torch.from_numpy(self.words(start, n, stream) < np.uint32(cut << 8)).view(tuple(shape))
        return out if device is None or device.type == "cpu" else out.to(device, non_blocking=True)
