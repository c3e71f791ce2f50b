"""Tensor parity with a real mergekit install, for a few deterministic recipes.

Skipped unless MERGESMITH_MERGEKIT points at a `mergekit-yaml` executable (e.g. one installed in a venv:
`python -m venv --system-site-packages /tmp/mkvenv && /tmp/mkvenv/bin/pip install mergekit==0.1.5`,
then `MERGESMITH_MERGEKIT=/tmp/mkvenv/bin/mergekit-yaml pytest tests/test_mergekit_parity.py`).
Both tools merge the same float32 toy models; outputs must agree to 1e-5 relative (pure rounding).
The full table over every method is benchmarks/parity.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergesmith.toymodels import load_state_dict, make_base, make_finetune

MERGEKIT = os.environ.get("MERGESMITH_MERGEKIT")
SRC = Path(__file__).resolve().parents[1] / "src"

pytestmark = pytest.mark.skipif(not MERGEKIT, reason="set MERGESMITH_MERGEKIT=/path/to/mergekit-yaml to run")


@pytest.fixture(scope="module")
def mk_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("parity_models")
    base = make_base(root / "base", layers=3, hidden=64, vocab=128, seed=0, dtype=torch.float32)
    models = {"base": base, **{f"ft{i}": make_finetune(base, root / f"ft{i}", seed=i) for i in (1, 2, 3)}}
    for d in models.values():  # mergekit needs `architectures`, which toymodels' bare config lacks
        cfg = json.loads((d / "config.json").read_text())
        cfg.setdefault("architectures", ["LlamaForCausalLM"])
        (d / "config.json").write_text(json.dumps(cfg))
    return {k: str(v) for k, v in models.items()}


def _recipe(name: str, m: dict[str, str]) -> dict:
    fts = [m["ft1"], m["ft2"], m["ft3"]]
    if name == "linear":
        ms = [{"model": f, "parameters": {"weight": w}} for f, w in zip(fts, (1.0, 0.5, 0.25), strict=True)]
        return {"merge_method": "linear", "models": ms, "dtype": "float32"}
    if name == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": m["base"],
            "slices": [
                {"sources": [{"model": m["base"], "layer_range": [0, 3]}, {"model": fts[0], "layer_range": [0, 3]}]}
            ],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]},
            "dtype": "float32",
        }
    if name == "ties":
        ms = [
            {"model": f, "parameters": {"density": 0.5, "weight": [1.0, 0.5] if i == 0 else 0.6}}
            for i, f in enumerate(fts)
        ]
        return {"merge_method": "ties", "base_model": m["base"], "models": ms, "dtype": "float32"}
    if name == "breadcrumbs_ties":
        ms = [{"model": f, "parameters": {"density": 0.7, "gamma": 0.05, "weight": 0.5}} for f in fts]
        return {"merge_method": "breadcrumbs_ties", "base_model": m["base"], "models": ms, "dtype": "float32"}
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["linear", "slerp", "ties", "breadcrumbs_ties"])
def test_same_tensors_as_mergekit(name: str, mk_models: dict[str, str], tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(_recipe(name, mk_models), sort_keys=False))
    mk, ms = tmp_path / "mergekit", tmp_path / "mergesmith"
    flags = ["--no-copy-tokenizer", "--random-seed", "0"]
    p = subprocess.run([MERGEKIT, str(recipe), str(mk), *flags], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=str(SRC))
    p = subprocess.run(
        [sys.executable, "-m", "mergesmith.cli", "run", str(recipe), str(ms), "--quiet", *flags],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    ours, theirs = load_state_dict(ms), load_state_dict(mk)
    assert set(ours) == set(theirs)
    for n, t in theirs.items():
        assert ours[n].dtype == t.dtype == torch.float32, n
        diff = (ours[n].double() - t.double()).abs().max().item()
        assert diff <= 1e-5 * t.double().abs().max().item(), (n, diff)
    cfg_ours = json.loads((ms / "config.json").read_text())
    cfg_theirs = json.loads((mk / "config.json").read_text())
    for key in ("num_hidden_layers", "vocab_size", "tie_word_embeddings"):
        assert cfg_ours.get(key) == cfg_theirs.get(key), key
