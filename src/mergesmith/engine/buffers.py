"""Reused scratch memory: the executor's chunks land in the same pages tensor after tensor."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mergesmith.dtypes import numel
from mergesmith.lazy_torch import torch


class Buffers:
    """Growable scratch memory, one buffer per slot, reused from tensor to tensor (no page faults):
    `raw` gives bytes (NumPy, CPU only), `get` a torch view of a shape and dtype."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._store: dict[object, object] = {}  # slot -> uint8 NumPy array (CPU) or torch tensor (device)
        self._views: dict[tuple, torch.Tensor] = {}  # (slot, shape, dtype) -> view of the slot's buffer

    def _buffer(self, slot: object, nbytes: int):
        buf = self._store.get(slot)
        if buf is None or len(buf) < nbytes:
            self._store.pop(slot, None)
            self._views = {k: v for k, v in self._views.items() if k[0] != slot}
            if self.device == "cpu":
                buf = np.empty(nbytes, dtype=np.uint8)
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._store[slot] = buf
        return buf

    def raw(self, slot: object, nbytes: int) -> np.ndarray:
        return self._buffer(slot, nbytes)[:nbytes]

    def get(self, slot: object, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        view = self._views.get((slot, shape, dtype))
        if view is not None:  # the same chunk shape as before: no view chain to rebuild
            return view
        n = numel(shape)
        nbytes = max(n * dtype.itemsize, 1)
        buf = self._buffer(slot, nbytes)
        whole = torch.from_numpy(buf) if isinstance(buf, np.ndarray) else buf
        view = whole[:nbytes].view(dtype)[:n].view(shape)
        if len(self._views) < 256:
            self._views[(slot, shape, dtype)] = view
        return view


def as_bytes(part: torch.Tensor) -> np.ndarray:
    """The bytes of `part`, a contiguous CPU tensor (an output slot's view), without a copy."""
    return part.reshape(-1).view(torch.uint8).numpy()


#: `target(shape)` -> (an output buffer of that shape, a token the caller gives back with it): where
#: the torch lanes cast each result chunk (a writer slot's memory, or a tensor being assembled).
Target = Callable[[tuple[int, ...]], tuple["torch.Tensor", object]]
