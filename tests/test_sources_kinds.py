"""sources/ sits at the bottom: it imports nothing above it, and the kinds of reference a higher layer
adds (base+adapter, from lora/) reach it only through the kind registry of sources/kinds.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from lora_adapters import build_adapter

from mergesmith.lora.inputs import BASE_PLUS_ADAPTER
from mergesmith.sources.kinds import kind_for
from mergesmith.sources.model import load_model_info
from mergesmith.sources.reader import TensorReader, open_source
from mergesmith.sources.refs import ModelRef, parse_ref

ABOVE = ["mergesmith.lora", "mergesmith.tokenizer", "mergesmith.plan", "mergesmith.engine"]
ABOVE += ["mergesmith.merge", "mergesmith.preparation"]


def fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_importing_every_sources_module_imports_nothing_above_it() -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        "import mergesmith.sources as pkg\n"
        "mods = [m.name for m in pkgutil.iter_modules(pkg.__path__, 'mergesmith.sources.')]\n"
        "for m in mods: importlib.import_module(m)\n"
        "print(len(mods))\n"
        f"above = {ABOVE!r}\n"
        "print(sorted(n for n in sys.modules if any(n == a or n.startswith(a + '.') for a in above)))\n"
    )
    result = fresh_python(code)
    assert result.returncode == 0, result.stderr
    count, loaded = result.stdout.splitlines()
    assert int(count) >= 7  # arch, hub, kinds, model, reader, refs, structure
    assert loaded == "[]"


def test_without_lora_a_base_plus_adapter_reference_is_a_clear_error(models: dict[str, Path]) -> None:
    code = (
        "from mergesmith.errors import MergeError\n"
        "from mergesmith.sources.model import load_model_info\n"
        "from mergesmith.sources.refs import parse_ref\n"
        f"ref = parse_ref({str(models['base']) + '+adapter'!r}, 'models[0]')\n"
        "try:\n    load_model_info(ref)\nexcept MergeError as err:\n    print(err)\n"
    )
    result = fresh_python(code)
    assert result.returncode == 0, result.stderr
    assert "mergesmith.lora" in result.stdout and "+adapter" in result.stdout


def test_base_plus_adapter_resolves_through_the_registry(models: dict[str, Path], tmp_path: Path) -> None:
    expected = build_adapter(models["base"], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    ref = parse_ref(f"{models['base']}+{tmp_path / 'adapter'}", "models[0]")
    assert kind_for(ref) is BASE_PLUS_ADAPTER
    assert kind_for(ModelRef(str(models["base"]))) is None
    info = load_model_info(ref)
    assert info.opener is not None and info.ref == ref
    source = open_source(info)
    base = TensorReader(load_model_info(ModelRef(str(models["base"]))))
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(source.get(name), expected[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(source.get(name), base.get(name))  # the adapter is applied
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(source.get(untouched), base.get(untouched))


def test_bin_checkpoint_tensors_are_carried_by_the_model_info(models: dict[str, Path]) -> None:
    info = load_model_info(ModelRef(str(models["ft3"])))
    assert info.format == "bin" and info.opener is None
    saved = torch.load(models["ft3"] / "pytorch_model.bin", weights_only=True)
    assert info.bin_tensors is not None and set(info.bin_tensors) == set(saved) == set(info.tensors)
    source = open_source(info)
    for name, tensor in saved.items():
        assert torch.equal(source.get(name), tensor)
