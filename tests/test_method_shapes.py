"""Methods declare their shape (`merge_method(elementwise=, identity=, whole_when=)`); the engine
reads the declaration and names no method or parameter itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from mergesmith.methods.registry import METHODS, get_method
from mergesmith.rng import TensorRNG

ENGINE = Path(__file__).resolve().parents[1] / "src" / "mergesmith" / "engine"


def _params(name: str, n: int) -> dict:
    """Values for every parameter of method `name` (defaults; the required ones set), `n` models."""
    method = get_method(name)
    values = {"weight": 0.4, "t": 0.3, "density": 1.0, "epsilon": 1e-3}
    out = {}
    for p in method.params.values():
        value = values.get(p.name, 0.5) if p.required else p.default
        out[p.name] = [value] * n if p.per_model and not isinstance(value, list) else value
    return out


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if m.elementwise_when is not None))
def test_a_method_declared_elementwise_merges_halves_like_the_whole(name):
    """Element j from elements j: the two halves of a tensor, merged apart and joined, are the
    merge of the whole tensor (checked with values where any cross-element maths would show)."""
    method = get_method(name)
    n = method.models[0] if method.models[1] == method.models[0] else 2
    params = _params(name, n)
    assert method.elementwise(params)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 6, generator=gen) if method.base != "input" else None
    xs = [torch.randn(8, 6, generator=gen) * (i + 1) for i in range(n)]

    def run(rows: slice) -> torch.Tensor:
        b = base[rows].clone() if base is not None else None
        return method([x[rows].clone() for x in xs], b, params, rng=TensorRNG(0, "t", ()))

    whole = run(slice(0, 8))
    assert torch.equal(torch.cat([run(slice(0, 3)), run(slice(3, 8))]), whole)


def test_task_arithmetic_is_elementwise_only_unpruned_and_passthrough_an_identity_only_unscaled():
    ta, passthrough = get_method("task_arithmetic"), get_method("passthrough")
    assert ta.elementwise({"density": [1.0, 1.0]}) and not ta.elementwise({"density": [1.0, 0.5]})
    assert passthrough.identity({"scale": [1.0]}) and not passthrough.identity({"scale": [0.5]})
    assert not get_method("linear").identity({"weight": [1.0]})


def test_whole_tensor_reasons_come_from_the_declarations():
    assert get_method("ties").whole_reason({"rescale": True, "density": [0.5, 1.0]}).startswith("rescale")
    assert get_method("ties").whole_reason({"rescale": False, "density": [0.5, 1.0]}) is None
    assert get_method("sce").whole_reason({"select_topk": 0.5}).startswith("select_topk")
    assert get_method("linear").whole_reason({"weight": [1.0]}) is None
    whole_only = [m for m in METHODS.values() if not m.streams and m.elementwise_when is None]
    assert whole_only and all(m.whole_reason({}) == f"{m.name} takes whole tensors" for m in whole_only)


def test_the_engine_names_no_method():
    """No string constant in engine/ is a method's name: the lanes come from the declarations."""
    names = set(METHODS)
    found = []
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert not found
