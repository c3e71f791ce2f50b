"""Which of several equal magnitudes survive a density cut: the rule docs/methods.md states, per method.

The models' values are multiples of 1/8 and their task vectors take four magnitudes only, so every
cut falls inside a run of exactly equal values (as on bfloat16 models), on tensors large enough to be
merged in several chunks with a sampled threshold (the streamed and raw lanes). The expected outputs
come from sorting positions by hand, written here from the documented rule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import merge, tensors

from mergesmith.methods.sparsify import magnitude_ranks
from mergesmith.toymodels import load_state_dict, make_base, save_state_dict

STEPS = torch.tensor([0.25, 0.5, 0.75, 1.0])


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base with values k/8 and two fine-tunes whose deltas are ±{1/4, 1/2, 3/4, 1}: all exact in float32."""
    root = tmp_path_factory.mktemp("tied")
    base = make_base(root / "base", layers=1, hidden=80, vocab=8192, seed=0)  # embeddings: 655K values, 2 chunks
    gen = torch.Generator().manual_seed(7)
    state = {k: (torch.randint(-8, 9, v.shape, generator=gen) / 8).float() for k, v in load_state_dict(base).items()}
    save_state_dict(base, state)
    out = {"base": base}
    for i in (1, 2):
        ft = {}
        for k, v in state.items():
            step = STEPS[torch.randint(0, 4, v.shape, generator=gen)]
            sign = torch.randint(0, 2, v.shape, generator=gen) * 2 - 1
            ft[k] = v + step * sign
        d = root / f"ft{i}"
        d.mkdir()
        for f in base.iterdir():
            if f.suffix == ".json" or f.name.startswith("tokenizer"):
                (d / f.name).write_bytes(f.read_bytes())
        save_state_dict(d, ft)
        out[f"ft{i}"] = d
    return out


def order(values: torch.Tensor, descending: bool) -> torch.Tensor:
    """Positions sorted by value, equal values by position (lowest first): torch's stable sort."""
    v = values.flatten()
    return torch.argsort(-v if descending else v, stable=True)


def keep_mask(positions: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.float64)
    mask[positions] = 1
    return mask


NAME = "model.embed_tokens.weight"


def recipe(method: str, tied: dict[str, Path], models: tuple[str, ...], **params: object) -> dict:
    return {
        "merge_method": method,
        "base_model": str(tied["base"]),
        "models": [{"model": str(tied[m]), "parameters": {"weight": 1.0, **params}} for m in models],
        "dtype": "float32",
    }


@pytest.mark.parametrize("density", [0.3, 0.55])
def test_ties_keeps_the_lowest_index_of_equal_magnitudes(tied: dict[str, Path], tmp_path: Path, density: float):
    """One model, weight 1: y = b + the ⌊density·n⌋ largest |δ|, ties to the lowest flat index."""
    merge(recipe("ties", tied, ("ft1",), density=density), tmp_path / "out")
    b, x = tensors(tied["base"])[NAME].double(), tensors(tied["ft1"])[NAME].double()
    d = (x - b).flatten()
    k = int(density * d.numel())
    assert (d.abs() == d.abs().flatten()[order(d.abs(), True)[k - 1]]).sum() > 1000  # the cut is inside a tie
    expected = b.flatten() + d * keep_mask(order(d.abs(), True)[:k], d.numel())
    assert torch.equal(tensors(tmp_path / "out")[NAME].double().flatten(), expected)


def test_breadcrumbs_cuts_equal_magnitudes_by_index(tied: dict[str, Path], tmp_path: Path):
    """Rank |δ| ascending, equal magnitudes with the lower index ranked higher; keep ranks [bottom, n − top)."""
    density, gamma = 0.4, 0.1
    merge(recipe("breadcrumbs", tied, ("ft1",), density=density, gamma=gamma), tmp_path / "out")
    b, x = tensors(tied["base"])[NAME].double(), tensors(tied["ft1"])[NAME].double()
    d = (x - b).flatten()
    n = d.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    ranked = n - 1 - order(d.abs().flip(0), False)  # ascending; among equals the lowest index last
    expected = b.flatten() + d * keep_mask(ranked[bottom : n - top], n)
    assert torch.equal(tensors(tmp_path / "out")[NAME].double().flatten(), expected)


def test_sce_selects_equal_variances_by_lowest_index(tied: dict[str, Path], tmp_path: Path):
    select = 0.3
    out = tmp_path / "out"
    merge({**recipe("sce", tied, ("ft1", "ft2")), "parameters": {"select_topk": select}}, out)
    b = tensors(tied["base"])[NAME].double().flatten()
    taus = [tensors(tied[m])[NAME].double().flatten() - b for m in ("ft1", "ft2")]
    mean = (taus[0] + taus[1]) / 2
    var = ((taus[0] - mean) ** 2 + (taus[1] - mean) ** 2) / 2
    k = int(int((var != 0).sum()) * select)
    mask = keep_mask(order(var, True)[:k], b.numel())
    taus = [t * mask for t in taus]
    energy = [float((t**2).mean()) for t in taus]
    omega = [e / sum(energy) for e in energy]
    sigma = torch.where(taus[0] + taus[1] >= 0, 1.0, -1.0).double()
    agree = [(torch.sign(t) == sigma).double() for t in taus]
    num = sum(w * a * t for w, a, t in zip(omega, agree, taus, strict=True))
    den = torch.clamp(sum(w * a for w, a in zip(omega, agree, strict=True)), min=1e-6)
    got = tensors(out)[NAME].double().flatten()
    assert torch.allclose(got, b + num / den, rtol=0, atol=1e-6)
    assert math.isclose(float((got != b).double().mean()), float((mask * (agree[0] + agree[1] > 0)).mean()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # NumPy's keyed sort, torch's stable argsort
def test_della_ranks_equal_magnitudes_by_position(dtype: torch.dtype):
    """rank = #(smaller |δ|) + #(equal |δ| at a lower index): the earlier of two equals ranks lower."""
    gen = torch.Generator().manual_seed(3)
    rows = (
        STEPS[torch.randint(0, 4, (5, 300), generator=gen)] * (torch.randint(0, 2, (5, 300), generator=gen) * 2 - 1)
    ).to(dtype)
    got = magnitude_ranks(rows.clone())
    for r in range(rows.shape[0]):
        a = rows[r].abs().tolist()
        ranks = [sum(aj < ai for aj in a) + sum(a[j] == ai for j in range(i)) for i, ai in enumerate(a)]
        assert got[r].tolist() == [float(x) for x in ranks]
