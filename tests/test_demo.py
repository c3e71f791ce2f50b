"""`mergesmith demo` then `mergesmith eval`, as scripts/quickstart.sh runs them: each fine-tune has
learned its own skill and not the other's, and the merge keeps both."""

from __future__ import annotations

import json
from pathlib import Path

from console import mergesmith


def test_demo_merge_keeps_both_skills(tmp_path: Path) -> None:
    demo = mergesmith("demo", "d", cwd=tmp_path)
    assert demo.returncode == 0, demo.stdout
    assert "transformers loaded the merge and generated: 'one two three" in demo.stdout
    tasks = ["--task", "d/demo-count.jsonl", "--task", "d/demo-colors.jsonl"]
    ev = mergesmith("eval", "d/merged", *tasks, "--output-json", "scores.json", cwd=tmp_path)
    assert ev.returncode == 0, ev.stdout
    acc = {
        Path(m).name: {t: s["acc"] for t, s in r.items()}
        for m, r in json.loads((tmp_path / "scores.json").read_text())["results"].items()
    }
    assert set(acc) == {"merged", "base", "finetune-count", "finetune-colors"}
    assert acc["merged"] == {"demo-count": 1.0, "demo-colors": 1.0}, acc
    assert acc["finetune-count"]["demo-count"] == 1.0 and acc["finetune-count"]["demo-colors"] <= 0.5, acc
    assert acc["finetune-colors"]["demo-colors"] == 1.0 and acc["finetune-colors"]["demo-count"] <= 0.5, acc
    assert max(acc["base"].values()) <= 0.5, acc
