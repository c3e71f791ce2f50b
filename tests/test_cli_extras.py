"""A missing optional dependency is one line naming the extra to install, exit 2, no traceback.

The console script runs with a `sitecustomize.py` first on PYTHONPATH that blocks the imports
named in MERGESMITH_TEST_HIDE (`sys.modules[name] = None` makes `import name` raise ImportError),
as if the extra had never been installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from console import mergesmith

SHIM = """\
import os, sys
for name in os.environ.get("MERGESMITH_TEST_HIDE", "").split(","):
    if name:
        sys.modules[name] = None
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("extras")
    (root / "shim").mkdir()
    (root / "shim" / "sitecustomize.py").write_text(SHIM)
    (root / "qa.jsonl").write_text(json.dumps({"prompt": "one two", "choices": ["cat", "dog"], "label": 0}) + "\n")
    genome = {
        "genome": {"models": [str(models["ft1"]), str(models["ft2"])], "merge_method": "linear"},
        "tasks": [{"path": str(root / "qa.jsonl")}],
    }
    (root / "genome.yml").write_text(yaml.safe_dump(genome))
    (root / "adapter").mkdir()
    return root


CASES = [
    ("cma", ["search", "genome.yml", "--storage-path", "s1", "--max-evals", "1"], "search", "--optimizer: the cmaes"),
    ("optuna", ["search", "genome.yml", "--storage-path", "s2", "--optimizer", "pareto"], "search", "pareto"),
    ("ray", ["search", "genome.yml", "--storage-path", "s3", "--workers", "2"], "search-ray", "--workers > 1"),
    ("lm_eval", ["eval", "{base}", "-t", "hellaswag"], "eval", "--task: an lm-eval task"),
    ("matplotlib", ["eval", "{base}", "-t", "qa.jsonl", "--plot", "p.png"], "eval", "--plot: mergesmith eval --plot"),
]


@pytest.mark.parametrize(("module", "args", "extra", "what"), CASES, ids=[c[0] for c in CASES])
def test_missing_extra_names_its_install_line(
    work: Path, models: dict[str, Path], module: str, args: list[str], extra: str, what: str
) -> None:
    argv = [a.format(base=models["base"]) for a in args]
    proc = mergesmith(*argv, cwd=work, extra_path=(work / "shim",), MERGESMITH_TEST_HIDE=module)
    assert proc.returncode == 2, proc.stdout
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("error:")]
    assert what in line, line
    assert line.endswith(f"needs `pip install 'mergesmith[{extra}]'`"), line
    assert not (work / "p.png").exists()
