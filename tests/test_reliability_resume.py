"""Atomic, resumable output: a killed or failed merge never leaves a partial OUT, and --resume
finishes it byte-identically to an uninterrupted run."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from mergesmith.toymodels import make_base, make_finetune

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model big enough (~15 MB, many output shards) that writing takes a noticeable time; returns the recipe."""
    root = tmp_path_factory.mktemp("big")
    base = make_base(root / "base", layers=6, hidden=256, vocab=1000, seed=0)
    ft = make_finetune(base, root / "ft", seed=1)
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(base), "parameters": {"weight": 0.3}},
            {"model": str(ft), "parameters": {"weight": 0.7}},
        ],
    }
    path = root / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def clean(big: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("clean") / "out"
    result = run_cli("run", big, out, "--quiet", "--out-shard-size", "1M")
    assert result.exit_code == 0, result.output
    return hashes(out)


def staging(out: Path) -> Path:
    return out.parent / f".{out.name}.mergesmith-partial"


def finished_shards(out: Path) -> int:
    try:
        return len(json.loads((staging(out) / ".mergesmith-journal.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_then_resume_is_byte_identical(big, clean, tmp_path, seed):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mergesmith.cli", "run", str(big), str(out), "--quiet", "--out-shard-size", "1M"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rng = random.Random(seed)
    wanted = rng.randrange(0, 16)  # kill once this many shards are finished, plus a random delay
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and finished_shards(out) < wanted:
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Never partial: OUT is absent, or it is the whole, finished model.
    if out.exists():
        assert hashes(out) == clean
        return
    result = run_cli("run", big, out, "--quiet", "--out-shard-size", "1M", "--resume")
    assert result.exit_code == 0, result.output
    assert hashes(out) == clean
    assert not staging(out).exists()


def test_full_disk_is_a_clear_error_and_resumable(big, clean, tmp_path, monkeypatch):
    """ENOSPC injected at the file layer after ~5 MB: clear error, no OUT; --resume then completes."""
    out = tmp_path / "out"
    real_pwrite = os.pwrite
    budget = [5_000_000]

    def pwrite(fd: int, data, offset: int) -> int:
        n = memoryview(data).nbytes
        if n > budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        budget[0] -= n
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    result = run_cli("run", big, out, "--quiet", "--out-shard-size", "1M")
    assert result.exit_code == 2
    assert "cannot write output: No space left on device" in result.output
    assert "model-" in result.output  # names the file
    assert not out.exists()
    assert staging(out).exists()  # finished shards are kept for --resume
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    result = run_cli("run", big, out, "--quiet", "--out-shard-size", "1M", "--resume")
    assert result.exit_code == 0, result.output
    assert hashes(out) == clean


def test_resume_rewrites_a_damaged_shard(big, clean, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_pwrite = os.pwrite
    budget = [8_000_000]

    def pwrite(fd: int, data, offset: int) -> int:
        budget[0] -= memoryview(data).nbytes
        if budget[0] < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    assert run_cli("run", big, out, "--quiet", "--out-shard-size", "1M").exit_code == 2
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    shard = sorted(staging(out).glob("model-*"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # a flipped byte: the journal's hash no longer matches
    shard.write_bytes(bytes(data))
    assert run_cli("run", big, out, "--quiet", "--out-shard-size", "1M", "--resume").exit_code == 0
    assert hashes(out) == clean


def test_resume_of_a_different_merge_starts_over(big, clean, tmp_path):
    out = tmp_path / "out"
    staging(out).mkdir()
    (staging(out) / "model-00001-of-00016.safetensors.partial").write_bytes(b"junk")
    (staging(out) / ".mergesmith-journal.json").write_text('{"fingerprint": "other", "shards": {}}')
    assert run_cli("run", big, out, "--quiet", "--out-shard-size", "1M", "--resume").exit_code == 0
    assert hashes(out) == clean


def test_without_resume_a_stale_staging_dir_is_replaced(big, clean, tmp_path):
    out = tmp_path / "out"
    staging(out).mkdir()
    (staging(out) / "leftover").write_text("x")
    assert run_cli("run", big, out, "--quiet", "--out-shard-size", "1M").exit_code == 0
    assert hashes(out) == clean
