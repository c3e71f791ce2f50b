"""The layering of issue #18 item 7: the import-linter contract in pyproject.toml, and no import cycle
anywhere in src/ (imports inside functions count: grimp reads every import statement).

The contract allows no exception (no `ignore_imports`: import-linter would also fail on a stale one).
The cycle edges still allowed are in `KNOWN` below, each with the item of #18 that removes it; the
test fails when one no longer occurs, so the list only shrinks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

import mergesmith

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(mergesmith.__file__).resolve().parents[1]

# Import edges that close a cycle today, each removed by the named item of #18 (importer -> imported).
KNOWN: set[tuple[str, str]] = set()


def cycles(graph: grimp.ImportGraph, skip: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), ignoring the `skip` edges."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if (v, w) in skip:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return found


def edges_inside(graph: grimp.ImportGraph, group: list[str]) -> list[str]:
    """`importer:line -> imported` for every import between members of `group`: what to cut."""
    out = []
    for a in group:
        for b in group:
            for d in graph.get_import_details(importer=a, imported=b):
                out.append(f"{a}:{d['line_number']} -> {b}")
    return out


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("mergesmith", include_external_packages=False)


def test_no_import_cycles(graph: grimp.ImportGraph) -> None:
    found = cycles(graph, KNOWN)
    assert not found, "import cycles in src/:\n" + "\n".join("\n  ".join(edges_inside(graph, g)) for g in found)


def test_known_cycle_edges_still_exist(graph: grimp.ImportGraph) -> None:
    """A fixed exception must leave KNOWN, so it cannot come back unnoticed."""
    gone = [e for e in sorted(KNOWN) if e[1] not in graph.find_modules_directly_imported_by(e[0])]
    assert not gone, f"these imports are gone: delete them from KNOWN: {gone}"


def test_cycle_finder_sees_a_cycle_inside_a_function(tmp_path: Path) -> None:
    """The check itself: a function-level import closing a circle is a cycle."""
    pkg = tmp_path / "circlepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from circlepkg import b\n")
    (pkg / "b.py").write_text("def late():\n    from circlepkg import a\n    return a\n")
    sys.path.insert(0, str(tmp_path))
    try:
        g = grimp.build_graph("circlepkg", cache_dir=None)
    finally:
        sys.path.remove(str(tmp_path))
    assert cycles(g, set()) == [["circlepkg.a", "circlepkg.b"]]
    assert cycles(g, {("circlepkg.b", "circlepkg.a")}) == []


def test_import_linter_contract() -> None:
    """`lint-imports` with the contract in pyproject.toml (what `.ci/run` checks through this test)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_registry_alone_sees_every_method() -> None:
    """get_method no longer imports the methods package (the cycle registry -> methods): importing the
    registry by itself runs the package's __init__ first, so a fresh interpreter still finds every method."""
    code = (
        "from mergesmith.methods.registry import METHODS, get_method\n"
        "assert get_method('della').name == 'della' and len(METHODS) >= 20, sorted(METHODS)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
