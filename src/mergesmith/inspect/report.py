"""The report as a JSON-ready dict (every figure of the survey), and writing it to a file.

Top-level keys: `models` (the task models, in order), `base`, `merged`, `overall` and `layers` (one
entry per layer, with `index`), each holding `cosine` (models x models) and `norm` (per model, the
task vector's norm relative to the base's), `base_cosine` (per model:
the cosine of its weights with the base's), the sign conflict, the kept mass, the spectra summary,
and the same per module type under `modules`; `spectra` (per matrix), `tokenizers`, `findings`.
Undefined figures (the cosine of a zero task vector) are null.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from mergesmith.errors import MergeError
from mergesmith.inspect.stats import CURVE, OVERLAP_RANK, Figures
from mergesmith.inspect.survey import Group, Survey
from mergesmith.inspect.vocab import tokenizer_difference


def _num(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _ratio(a: float, b: float) -> float | None:
    return _num(a / b) if b > 0 else None


def figures_json(f: Figures) -> dict[str, Any]:
    sq = np.diag(f.gram)
    k = f.count
    out: dict[str, Any] = {
        "numel": f.numel,
        "norm": [_ratio(math.sqrt(max(s, 0.0)), math.sqrt(max(f.base_sq, 0.0))) for s in sq],
        "cosine": [[_ratio(f.gram[i, j], math.sqrt(sq[i] * sq[j])) for j in range(k)] for i in range(k)],
        "base_cosine": [
            _ratio(f.base_sq + f.base_dot[i], math.sqrt(f.base_sq * max(f.base_sq + 2 * f.base_dot[i] + sq[i], 0.0)))
            for i in range(k)
        ],
        "sign_conflict": {
            "rate": _ratio(f.conflict_mass.sum(), f.abs_mass.sum()),
            "per_model": [_ratio(c, a) for c, a in zip(f.conflict_mass, f.abs_mass, strict=True)],
        },
        "kept_mass": None,
        "kept_mass_curve": {
            f"{d:g}": [_ratio(c, a) for c, a in zip(f.curve_mass[i], f.abs_mass, strict=True)]
            for i, d in enumerate(CURVE)
        },
        "spectra": None,
        "merged": None,
    }
    if f.has_density and f.numel:
        out["kept_mass"] = {
            "density": [_num(d / f.numel) for d in f.density_numel],
            "kept": [_ratio(c, a) for c, a in zip(f.kept_mass, f.abs_mass, strict=True)],
        }
    if f.matrices:
        out["spectra"] = {
            "matrices": f.matrices,
            "energy_top": [_ratio(e, s) for e, s in zip(f.top_energy, f.matrix_sq, strict=True)],
            "energy_top_sum": _ratio(f.top_energy_sum, f.matrix_sum_sq),
            "overlap": [[_num(v / f.matrices) for v in row] for row in f.overlap_sum],
        }
    if f.merged:
        out["merged"] = {
            "norm": _ratio(math.sqrt(f.merged_sq), math.sqrt(f.base_sq)),
            "toward": [_ratio(d, s) for d, s in zip(f.merged_dot, sq, strict=True)],
            "cosine": [_ratio(d, math.sqrt(f.merged_sq * s)) for d, s in zip(f.merged_dot, sq, strict=True)],
        }
    return out


def group_json(g: Group) -> dict[str, Any]:
    out = figures_json(g.figures)
    out["modules"] = {name: figures_json(f) for name, f in sorted(g.modules.items())}
    return out


def build_report(s: Survey, rank: int) -> dict[str, Any]:
    """Every figure of the survey, without findings (see `findings.findings`)."""
    subject = s.subject
    return {
        "version": 1,
        "base": subject.base.name,
        "models": subject.names,
        "merged": subject.merged.name if subject.merged is not None else None,
        "method": subject.method,
        "settings": {"rank": rank, "overlap_rank": OVERLAP_RANK, "curve": list(CURVE)},
        "tensors": s.tensors,
        "elements": s.elements,
        "overall": group_json(s.overall),
        "layers": [{"index": i, **group_json(g)} for i, g in s.layers.items()],
        "spectra": [
            {
                "tensor": e.tensor,
                "layer": e.layer,
                "module": e.module,
                "shape": list(e.shape),
                "sketch_rank": e.spectra.sketch_rank,
                "sigma": e.spectra.sigma,
                "sigma_sum": e.spectra.sigma_sum,
                "rank90": e.spectra.rank90,
                "rank90_sum": e.spectra.rank90_sum,
                "overlap": [[_num(v) for v in row] for row in e.spectra.overlap],
            }
            for e in s.spectra
        ],
        "tokenizers": {m.name: tokenizer_difference(subject.base, m) for m in subject.models},
        "vocab_rows": {name: {"compared": a, "base": b} for name, (a, b) in s.vocab_rows.items()},
        "findings": [],
    }


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """Written beside the target and renamed into place: never a half-written file."""
    write_text(path, json.dumps(report, indent=1, allow_nan=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise MergeError(f"cannot write: {err.strerror or err}", str(path)) from None
