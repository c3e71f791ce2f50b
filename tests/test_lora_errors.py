"""Bad LoRA inputs: one clear message, a non-zero exit code, and no output that looks complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lora_adapters import build_adapter

from mergesmith.toymodels import make_base

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(tmp_path: Path, model: str, *flags: str) -> subprocess.CompletedProcess:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        yaml.safe_dump({"merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1}}]})
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    cmd = [sys.executable, "-m", "mergesmith.cli", "run", str(recipe), str(tmp_path / "out"), "--quiet", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def assert_clean_failure(result: subprocess.CompletedProcess, tmp_path: Path, *phrases: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))  # no staging directory left behind


@pytest.fixture(scope="module")
def adapter(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "a"
    build_adapter(models["base"], out, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return out


def test_missing_adapter_weights(models: dict[str, Path], adapter: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    result = run(tmp_path, f"{models['base']}+{broken}")
    assert_clean_failure(result, tmp_path, "adapter weights missing", str(broken))


def test_adapter_for_another_base(adapter: Path, tmp_path: Path) -> None:
    other = make_base(tmp_path / "other", layers=2, hidden=16, vocab=96, seed=9)
    result = run(tmp_path, f"{other}+{adapter}")
    assert_clean_failure(result, tmp_path, "shape mismatch", "another base model")


def test_adapter_only_reference_names_the_base(models: dict[str, Path], adapter: Path, tmp_path: Path) -> None:
    result = run(tmp_path, str(adapter))
    assert_clean_failure(result, tmp_path, "LoRA adapter", f"'{models['base']}+{adapter}'")


def test_unknown_peft_type_is_named(models: dict[str, Path], adapter: Path, tmp_path: Path) -> None:
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    (ia3 / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    result = run(tmp_path, f"{models['base']}+{ia3}")
    assert_clean_failure(result, tmp_path, "peft_type 'IA3'", str(ia3))


def test_as_lora_needs_a_base_model(models: dict[str, Path], adapter: Path, tmp_path: Path) -> None:
    result = run(tmp_path, f"{models['base']}+{adapter}", "--as-lora", "4")
    assert_clean_failure(result, tmp_path, "base_model")
