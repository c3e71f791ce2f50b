"""`torch`, imported on first use.

`import torch` costs 2-3 s of start-up on the 2-core machines measured here: as much as a whole
linear merge of a 1B model by the compiled kernels. The modules a merge runs through take `torch`
from here instead, so a merge that needs no torch (pure copies, fused kernels: see
`engine.executor`) never imports it, and every other one imports it where it first needs it.

    from mergesmith.lazy_torch import torch

Module-level code must not touch an attribute of it (that would import torch at once); annotations
are strings (`from __future__ import annotations`), so they do not count.
"""

from __future__ import annotations

import importlib
from typing import Any


class _LazyModule:
    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr: str) -> Any:
        """Only called for names not found (the first use, and a submodule not imported yet)."""
        module = importlib.import_module(object.__getattribute__(self, "_name"))
        # From now on attributes are found in the module's own namespace, at a plain lookup's cost.
        object.__setattr__(self, "__dict__", module.__dict__)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {object.__getattribute__(self, '_name')!r}>"


torch: Any = _LazyModule("torch")
