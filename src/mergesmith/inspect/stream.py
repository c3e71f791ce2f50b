"""Row chunks of input tensors as float32, read with `pread` so memory stays bounded.

Plain safetensors inputs are read chunk by chunk straight from the file (`engine.mapped`: no mapped
pages pile up in the resident set, whatever the model's size). Other sources (`.bin` checkpoints,
`base+adapter` references) give whole tensors through their reader; those are sliced, so memory is
bounded by one tensor per model.
"""

from __future__ import annotations

import numpy as np

from mergesmith.engine.mapped import MappedFiles
from mergesmith.lazy_torch import torch
from mergesmith.sources.model import ModelInfo
from mergesmith.sources.reader import open_source

#: Elements per chunk and model (4 MB of float32: chunks stay in cache between the passes over them).
CHUNK = 1 << 20
_NUMPY = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32, "float64": np.float64}


class RowReader:
    """Reads rows of one model's tensors, each tensor seen as (rows, row elements)."""

    def __init__(self, info: ModelInfo, files: MappedFiles) -> None:
        self.info = info
        self.files = files
        self.source = open_source(info)
        self._raw = np.empty(0, dtype=np.uint8)
        self._whole: tuple[str, torch.Tensor] | None = None

    def rows(self, name: str, start: int, stop: int, width: int, out: torch.Tensor) -> None:
        """Rows `start` .. `stop` of tensor `name` (rows of `width` elements) into `out`, float32."""
        entry = self.files.entry(self.source, name)
        if entry is not None and entry.dtype in _NUMPY:
            size = np.dtype(_NUMPY[entry.dtype]).itemsize
            nbytes = (stop - start) * width * size
            if self._raw.nbytes < nbytes:
                self._raw = np.empty(nbytes, dtype=np.uint8)
            raw = self._raw[:nbytes]
            self.files.read_entry(entry, start * width * size, raw)
            values = torch.from_numpy(raw.view(_NUMPY[entry.dtype]))
            out.copy_(values.view(torch.bfloat16) if entry.dtype == "bfloat16" else values)
            return
        if self._whole is None or self._whole[0] != name:
            self._whole = None  # drop the previous tensor first
            self._whole = (name, self.source.get(name).reshape(-1))
        out.copy_(self._whole[1][start * width : stop * width])

    def done(self, name: str) -> None:
        """Forget a whole tensor kept for slicing."""
        if self._whole is not None and self._whole[0] == name:
            self._whole = None
