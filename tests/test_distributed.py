"""`mergesmith run --workers N`: one merge split across a local Ray cluster, byte-identical to a
single-process run even when a worker is killed mid-task, and resumable from a single-process run."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from fakehub import hub  # noqa: F401  (a fixture)

from mergesmith.toymodels import make_base, make_finetune

pytest.importorskip("ray")

SRC = str(Path(__file__).resolve().parents[1] / "src")
SHARD = "300K"  # ten shards of the model below


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DARE-TIES (random masks: each task must draw what the single process draws) of two fine-tunes."""
    root = tmp_path_factory.mktemp("dist")
    base = make_base(root / "base", layers=4, hidden=128, vocab=500, seed=0)
    models = [make_finetune(base, root / f"ft{i}", seed=i) for i in (1, 2)]
    recipe = {
        "merge_method": "dare_ties",
        "base_model": str(base),
        "models": [
            {"model": str(models[0]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(models[1]), "parameters": {"weight": 0.4, "density": 0.7}},
        ],
    }
    path = root / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def hashes(directory: Path) -> dict[str, str]:
    """Every file but the model card, which names the output directory."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.name != "README.md"}  # fmt: skip


@pytest.fixture(scope="module")
def single(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("single") / "out"
    result = run_cli("run", recipe, out, "--quiet", "--out-shard-size", SHARD, "--random-seed", "7")
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("model-*.safetensors"))) == 10
    return hashes(out)


def mergesmith(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mergesmith.cli", *map(str, args)]
    full_env = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=180)


def test_resume_with_workers_reuses_verified_shards_and_survives_a_killed_task(recipe, single, tmp_path, monkeypatch):
    """A single-process run stopped by a full disk; `--resume --workers 2` writes only the rest,
    though one of its tasks is killed mid-run (one Ray cluster start for both checks: they are slow)."""
    out, marker = tmp_path / "out", tmp_path / "died"
    real_pwrite = os.pwrite
    budget = [1_200_000]

    def pwrite(fd: int, data, offset: int) -> int:  # ENOSPC at the file layer after ~1.2 MB
        budget[0] -= memoryview(data).nbytes
        if budget[0] < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    flags = ["--quiet", "--out-shard-size", SHARD, "--random-seed", "7"]
    assert run_cli("run", recipe, out, *flags).exit_code == 2
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    staging = out.parent / f".{out.name}.mergesmith-partial"
    kept = json.loads((staging / ".mergesmith-journal.json").read_text())["shards"]
    assert 0 < len(kept) < 8
    inodes = {f: min(staging.glob(f + "*")).stat().st_ino for f in kept}  # a finished shard may be f.partial
    proc = mergesmith(
        "run", recipe, out, *flags, "--workers", "2", "--resume", "-v", env={"MERGESMITH_TEST_DIE_ONCE": str(marker)}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists(), "no task was killed: the test did not test anything"
    assert f"reusing {len(kept)} of 10 shards" in proc.stderr
    assert f"{10 - len(kept)} shards in 2 Ray tasks" in proc.stderr
    assert {f: os.stat(out / f).st_ino for f in kept} == inodes  # the same files, not rewritten
    assert hashes(out) == single
    report = json.loads((out / "merge_report.json").read_text())
    assert report["audit"]["checked_finite"] == report["audit"]["output_tensors"]  # tasks' and reused shards' audits


def test_without_ray_the_message_names_the_extra(recipe, tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None\n"  # what an environment without Ray sees on import
        "from mergesmith.cli import entry\n"
        f"sys.argv = ['mergesmith', 'run', {str(recipe)!r}, {str(tmp_path / 'out')!r}, '--workers', '2']\n"
        "entry()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "pip install 'mergesmith[distributed]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_hub_ids_resolve_in_the_workers_cache_and_survive_a_killed_task(recipe, single, tmp_path, hub):  # noqa: F811
    """The same merge with every model a hub id served by a local test hub: each task resolves the ids
    in the workers' cache, one task is killed mid-run, and the output equals the single-process merge
    of the same hub recipe."""
    spec = yaml.safe_load(recipe.read_text())
    local = [spec["base_model"], *(m["model"] for m in spec["models"])]
    for path, name in zip(local, ("org/base", "org/ft1", "org/ft2"), strict=True):
        hub.add(name, Path(path))
    spec["base_model"] = "org/base"
    for m, name in zip(spec["models"], ("org/ft1", "org/ft2"), strict=True):
        m["model"] = name
    hub_recipe = tmp_path / "hub.yml"
    hub_recipe.write_text(yaml.safe_dump(spec, sort_keys=False))
    flags = ["--quiet", "--out-shard-size", SHARD, "--random-seed", "7"]
    assert run_cli("run", hub_recipe, tmp_path / "one", *flags).exit_code == 0  # seeded draws follow the ids
    out, marker = tmp_path / "out", tmp_path / "died"
    hub.requests.clear()
    env = {"MERGESMITH_TEST_DIE_ONCE": str(marker), "HF_HUB_CACHE": str(tmp_path / "workers_cache")}
    proc = mergesmith("run", hub_recipe, out, *flags, "--workers", "2", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists(), "no task was killed: the test did not test anything"
    got, want = hashes(out), hashes(tmp_path / "one")
    got.pop("merge_report.json"), want.pop("merge_report.json")  # its resume fingerprint names the cache paths
    assert got == want
    report, one = (json.loads((d / "merge_report.json").read_text()) for d in (out, tmp_path / "one"))
    assert report["audit"] == one["audit"] and report["inputs"] == one["inputs"]
    assert "model.safetensors" in hub.fetched()  # into the workers' own, empty cache
    assert any((tmp_path / "workers_cache").rglob("model.safetensors"))
