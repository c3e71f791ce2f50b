"""Safe inputs: a pickle that would run code is refused before it runs; damaged files give one
clear error naming the file; nothing is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml
from conftest import run_cli


class Payload:
    """Unpickling this would call open(path, "w"): a file appearing means code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def run_bad(models, model_dir: Path, tmp_path: Path) -> str:
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(models["ft1"]), "parameters": {"weight": 1}},
            {"model": str(model_dir), "parameters": {"weight": 1}},
        ],
    }
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("run", path, tmp_path / "out", "--quiet")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    return result.output


def copy_model(models, key: str, dest: Path) -> Path:
    shutil.copytree(models[key], dest)
    return dest


def test_malicious_pickle_is_refused_and_never_runs(models, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copyfile(models["ft1"] / "config.json", evil / "config.json")
    marker = tmp_path / "pwned.txt"
    state = {"model.embed_tokens.weight": torch.zeros(96, 32), "payload": Payload(marker)}
    torch.save(state, evil / "pytorch_model.bin")
    assert not marker.exists()
    out = run_bad(models, evil, tmp_path)
    assert "refused to load" in out and "could run code" in out
    assert str(evil / "pytorch_model.bin") in out
    assert not marker.exists()


def test_truncated_safetensors(models, tmp_path):
    bad = copy_model(models, "ft1", tmp_path / "trunc")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-100])
    out = run_bad(models, bad, tmp_path)
    assert f"{bad / 'model.safetensors'}: truncated safetensors file" in out


def test_corrupt_safetensors_header(models, tmp_path):
    bad = copy_model(models, "ft1", tmp_path / "corrupt")
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[8:20] = b"not json at!"
    (bad / "model.safetensors").write_bytes(bytes(data))
    out = run_bad(models, bad, tmp_path)
    assert f"{bad / 'model.safetensors'}: corrupt safetensors file (header is not JSON)" in out


def test_missing_shard_named_in_index(models, tmp_path):
    bad = copy_model(models, "ft2", tmp_path / "noshard")
    (bad / "model-00002-of-00003.safetensors").unlink()
    out = run_bad(models, bad, tmp_path)
    assert "shard 'model-00002-of-00003.safetensors' named in the index is missing" in out
    assert str(bad / "model.safetensors.index.json") in out


def test_config_not_json(models, tmp_path):
    bad = copy_model(models, "ft1", tmp_path / "badcfg")
    (bad / "config.json").write_text("{'model_type': llama,")
    out = run_bad(models, bad, tmp_path)
    assert f"{bad / 'config.json'}: not valid JSON" in out
