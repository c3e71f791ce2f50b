"""`mergesmith search` with a JSONL task, through the console script, as docs/search.md runs it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from console import mergesmith

from mergesmith.toymodels import make_base, make_finetune


def test_search_with_a_jsonl_task_honours_limit(tmp_path: Path) -> None:
    """Rows whose two choices are the same string score the same for any model, and argmax keeps the first:
    label 1 is always wrong, label 0 always right. With `limit: 3` only the three wrong rows count, so every
    candidate's accuracy is exactly 0; without the limit it would be 0.5."""
    base = make_base(tmp_path / "base", layers=2, hidden=16, vocab=64, seed=0)
    fts = [str(make_finetune(base, tmp_path / f"ft{i}", seed=i)) for i in (1, 2)]
    rows = [{"prompt": "one two", "choices": ["cat", "cat"], "label": 1}] * 3
    rows += [{"prompt": "red green", "choices": ["dog", "dog"], "label": 0}] * 3
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    genome = {
        "genome": {"models": fts, "merge_method": "ties", "base_model": str(base), "layer_granularity": 0},
        "tasks": [{"path": "qa.jsonl", "weight": 1.0}],
        "limit": 3,
    }
    (tmp_path / "genome.yml").write_text(yaml.safe_dump(genome))
    proc = mergesmith(
        "search",
        "genome.yml",
        "--storage-path",
        "./search",
        "--max-evals",
        "4",
        "--optimizer",
        "random",
        "--quiet",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout
    history = [json.loads(line) for line in (tmp_path / "search" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 4
    assert all(e["scores"] == {"qa": 0.0} and e["fitness"] == 0.0 for e in history), history
    best = yaml.safe_load((tmp_path / "search" / "best_config.yaml").read_text())
    assert best["merge_method"] == "ties"
    proc = mergesmith("run", "./search/best_config.yaml", "./merged", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert (tmp_path / "merged" / "config.json").is_file()

    genome["limit"] = None
    (tmp_path / "genome.yml").write_text(yaml.safe_dump(genome))
    proc = mergesmith(
        "search",
        "genome.yml",
        "--storage-path",
        "./all",
        "--max-evals",
        "1",
        "--optimizer",
        "random",
        "--quiet",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout
    (entry,) = [json.loads(line) for line in (tmp_path / "all" / "history.jsonl").read_text().splitlines()]
    assert entry["scores"] == {"qa": 0.5}
