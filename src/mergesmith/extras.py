"""Optional dependencies: one place that turns a missing one into the `pip install` line that fixes it.

cma, optuna, ray, lm-eval, matplotlib and peft are extras (pyproject.toml), imported only by the
feature that needs them; without this, a user meets `ModuleNotFoundError` and a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mergesmith.errors import MergeError

# module -> the smallest extra (pyproject.toml) that installs it
EXTRA = {
    "cma": "search",
    "optuna": "search",
    "ray": "search-ray",
    "lm_eval": "eval",
    "matplotlib": "eval",
    "peft": "eval",
}


def require(module: str, feature: str, where: str | None = None) -> ModuleType:
    """Import `module` (a dotted name is fine) or raise a MergeError saying `feature` needs its extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRA[module.partition(".")[0]]
        raise MergeError(f"{feature} needs `pip install 'mergesmith[{extra}]'`", where) from None
