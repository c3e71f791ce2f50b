"""The task-vector family is declared as a table (methods/task_arithmetic.py); each member still shows
and takes exactly the parameters a hand-written signature gave it, and merges by its own pruner."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from method_calls import randn

from mergesmith.methods.registry import METHODS, REQUIRED

# (name, per-model parameters after weight and density, normalize default, rescale default, draws random masks)
EXPECTED = {
    "task_arithmetic": ({}, False, False, False),
    "ties": ({}, True, False, False),
    "dare_linear": ({}, False, True, True),
    "dare_ties": ({}, False, True, True),
    "breadcrumbs": ({"gamma": 0.01}, False, False, False),
    "breadcrumbs_ties": ({"gamma": 0.01}, False, False, False),
    "della": ({"epsilon": 0.15}, True, True, True),
    "della_linear": ({"epsilon": 0.15}, False, True, True),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_member_declares_the_parameters_of_its_signature(name: str) -> None:
    extra, normalize, rescale, random = EXPECTED[name]
    m = METHODS[name]
    want = [
        ("weight", "float", REQUIRED, True, "weight"),
        ("density", "float", 1.0, True, "density"),
        *((k, "float", d, True, k) for k, d in extra.items()),
        ("normalize", "bool", normalize, False, "normalize"),
        ("rescale", "bool", rescale, False, "rescale"),
        ("lambda", "float", 1.0, False, "lambda_"),
        ("int8_mask", "bool", False, False, "int8_mask"),
    ]
    got = [(p.name, p.type.__name__, p.default, p.per_model, p.arg) for p in m.params.values()]
    assert got == want
    assert m.base == "required" and m.models == (0, None) and m.uses_rng is random and m.streams
    assert m.storage_only == {"int8_mask": m.storage_only["int8_mask"]}


def test_methods_command_shows_a_member_as_before() -> None:
    """`mergesmith methods della`, as printed when della was written out by hand."""
    result = run_cli("methods", "della")
    assert result.exit_code == 0
    assert result.output == (
        "della: DELLA: magnitude-ranked random drop per row, L1 rescale, TIES sign consensus.\n"
        "paper: https://arxiv.org/abs/2406.11617\n"
        "base model: required\n"
        "  weight: float, default required, per model\n"
        "  density: float, default 1.0, per model\n"
        "  epsilon: float, default 0.15, per model\n"
        "  normalize: bool, default True\n"
        "  rescale: bool, default True\n"
        "  lambda: float, default 1.0\n"
        "  int8_mask: bool, default False\n"
        "\n"
        "Keep delta_i elements with p = density - eps + 2 eps rank/(n-1) (rank of |delta| in its row);\n"
        "D_i = w_i delta~_i, sigma = sign(sum_i D_i); y = b + lambda * sum_i M_i D_i / sum_i M_i w_i.\n"
    )


def test_defaults_fill_what_a_recipe_leaves_out() -> None:
    """ties given only the per-model lists (the plan always resolves those), no call helper filling the
    rest: normalize (True) and lambda (1) come from the declared defaults, density 1 prunes nothing:
    y = b + sum_i [agree] w_i d_i / sum_i [agree] w_i."""
    base, x1, x2 = (randn(4, 6, seed=s).float() for s in (3, 4, 5))
    out = METHODS["ties"]([x1.clone(), x2.clone()], base.clone(), {"weight": [0.3, 0.7], "density": [1.0, 1.0]})
    b, d1, d2 = base.double(), x1.double() - base.double(), x2.double() - base.double()
    total = 0.3 * d1 + 0.7 * d2
    sigma = torch.where(total >= 0, 1.0, -1.0).double()
    a1, a2 = (torch.sign(d1) == sigma).double(), (torch.sign(d2) == sigma).double()
    divisor = (0.3 * a1 + 0.7 * a2).clamp_min(0.15)
    expected = b + (0.3 * d1 * a1 + 0.7 * d2 * a2) / divisor
    assert torch.allclose(out.double(), expected, atol=1e-5)
