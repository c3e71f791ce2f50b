"""Fuzz the command line: random recipes (real methods, parameters of any type, real and missing
models) with random flag combinations through `mergesmith run --dry-run` never raise: every
outcome is a plan (exit 0) or clear messages (exit 2), never a traceback.

In process (Click's runner with exceptions propagated, so an uncaught one fails the example): a
subprocess per example would make hypothesis far too slow; the console script's rendering of the
same errors is tested in test_cli_commands.py."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import yaml
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergesmith.methods import METHODS


@pytest.fixture(autouse=True, scope="module")
def offline():
    """Random strings may look like hub ids: never go to the network for them."""
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    yield
    huggingface_hub.constants.HF_HUB_OFFLINE = before


SCALARS = st.one_of(
    st.floats(-2, 2),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300]),
    st.integers(-3, 40),
    st.booleans(),
    st.text(max_size=6),
    st.none(),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(st.floats(-1, 2), min_size=0, max_size=4),
    st.lists(
        st.fixed_dictionaries({"filter": st.sampled_from(["self_attn", "mlp", "zz"]), "value": SCALARS}), max_size=2
    ),
)
PARAM_NAMES = sorted({p for m in METHODS.values() for p in m.params} | {"wieght", "desnity"})
PARAMS = st.dictionaries(st.sampled_from(PARAM_NAMES), VALUES, max_size=4)
DTYPES = st.sampled_from([None, "float32", "bfloat16", "float16", "float33", 3])

FLAGS = st.lists(
    st.one_of(
        st.sampled_from(
            [
                ["--cuda"],
                ["--no-cuda"],
                ["--allow-nonfinite"],
                ["-v"],
                ["-vv"],
                ["--no-copy-tokenizer"],
                ["--no-write-model-card"],
                ["--trust-remote-code"],
                ["--resume"],
                ["--overwrite"],
                ["--quiet"],
                ["--lazy-unpickle"],
                ["--no-safe-serialization"],
            ]
        ),
        st.tuples(st.just("--device"), st.sampled_from(["cpu", "cuda", "cuda:7", "auto", "tpu", ""])).map(list),
        st.tuples(st.just("--out-shard-size"), st.sampled_from(["5B", "1k", "0", "-1", "2X", "1.5m", ""])).map(list),
        st.tuples(st.just("--random-seed"), st.sampled_from(["0", "7", "-1", "x"])).map(list),
        st.tuples(st.just("--lora-merge-dtype"), st.sampled_from(["bfloat16", "int4", ""])).map(list),
        st.tuples(st.just("--as-lora"), st.sampled_from(["8", "0", "-2", "x"])).map(list),
        st.tuples(st.just("--as-lora-energy"), st.sampled_from(["0.9", "0", "1.5"])).map(list),
        st.tuples(st.just("-j"), st.sampled_from(["1", "0", "-3"])).map(list),
    ),
    max_size=4,
)


@st.composite
def recipes(draw: st.DrawFn, models: dict[str, Path]) -> dict:
    refs = st.sampled_from([str(models[k]) for k in ("base", "ft1", "ft2", "ft3")] + ["/no/such/model", "org/x", ""])
    recipe: dict = {"merge_method": draw(st.sampled_from([*sorted(METHODS), "tie", 3]))}
    if draw(st.booleans()):
        recipe["base_model"] = draw(refs)
    entries = draw(st.lists(st.fixed_dictionaries({"model": refs}, optional={"parameters": PARAMS}), max_size=3))
    recipe["models"] = entries
    if draw(st.booleans()):
        recipe["parameters"] = draw(PARAMS)
    if (dtype := draw(DTYPES)) is not None:
        recipe["dtype"] = dtype
    return recipe


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_run_dry_run_never_raises(models: dict[str, Path], tmp_path: Path, data: st.DataObject) -> None:
    recipe = data.draw(recipes(models))
    flags = [f for group in data.draw(FLAGS) for f in group]
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = [str(tmp_path / "out")] if data.draw(st.booleans()) else []
    result = run_cli("run", path, *out, "--dry-run", *flags)  # an uncaught exception fails the example
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert result.output.strip(), "exit 2 without a message"
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
