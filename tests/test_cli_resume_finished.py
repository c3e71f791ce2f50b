"""`mergesmith run RECIPE OUT --resume` when OUT is already complete: exit 0, nothing rewritten;
refused (exit 2, OUT untouched) when OUT is another merge, a changed one, or not a merge."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from console import mergesmith


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_resume_of_a_finished_merge(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = {
        "merge_method": "ties",
        "base_model": str(models["base"]),
        "models": [{"model": str(models[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in ("ft1", "ft2")],
    }
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "out"
    first = mergesmith("run", "r.yml", "out", "--quiet", "--out-shard-size", "40k", cwd=tmp_path)
    assert first.returncode == 0, first.stdout
    before = snapshot(out)
    shards = sorted(n for n in before if n.endswith(".safetensors"))
    assert len(shards) > 1

    again = mergesmith("run", "r.yml", "out", "--quiet", "--out-shard-size", "40k", "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stdout
    assert f"already complete: {out} holds this merge ({len(shards)} shards checked); nothing to do" in again.stdout
    assert snapshot(out) == before  # not one file rewritten
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())  # no staging left behind

    recipe["models"][0]["parameters"]["weight"] = 0.7
    (tmp_path / "other.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    other = mergesmith("run", "other.yml", "out", "--quiet", "--out-shard-size", "40k", "--resume", cwd=tmp_path)
    assert other.returncode == 2
    assert other.stdout.strip() == (
        f"error: {out}: --resume: the output directory is not this merge, complete (it holds a different merge"
        " (the recipe's plan, the options or the input files changed)); pass --overwrite to replace it"
    )

    damaged = out / shards[1]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    bad = mergesmith("run", "r.yml", "out", "--quiet", "--out-shard-size", "40k", "--resume", cwd=tmp_path)
    assert bad.returncode == 2
    assert f"(its shard {shards[1]} is missing or changed)" in bad.stdout
    assert damaged.read_bytes() == bytes(data)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a merge")
    foreign = mergesmith("run", "r.yml", "mine", "--quiet", "--resume", cwd=tmp_path)
    assert foreign.returncode == 2
    assert "(it has no record of a finished mergesmith merge)" in foreign.stdout
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_the_finished_record_ignores_input_mtimes(models: dict[str, Path], tmp_path: Path) -> None:
    """Fresh copies of the same inputs (new mtimes) give the same merge_report.json, and a resume still
    finds the merge complete: the record counts input files by path and size, not by mtime."""
    import shutil

    from conftest import merge

    inputs = tmp_path / "in"
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(inputs / k), "parameters": {"weight": 0.5}} for k in ("ft1", "ft2")],
    }
    reports = []
    for run in ("a", "b"):
        shutil.rmtree(inputs, ignore_errors=True)
        for k in ("ft1", "ft2"):
            shutil.copytree(models[k], inputs / k)
        (tmp_path / run).mkdir()
        merge(recipe, tmp_path / run / "out")
        reports.append((tmp_path / run / "out" / "merge_report.json").read_bytes())
    assert reports[0] == reports[1]
    merge(recipe, tmp_path / "a" / "out", "--resume")  # inputs copied again since `a` was written
    assert (tmp_path / "a" / "out" / "merge_report.json").read_bytes() == reports[0]
