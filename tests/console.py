"""Run the installed `mergesmith` console script in a subprocess, as a user does.

The child inherits this checkout's `src/` on PYTHONPATH (and `tests/`, for `python:` objectives),
so the script imports the code under test; every call asserts that no traceback was printed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"
TESTS = Path(__file__).parent


def console_env(extra_path: tuple[str | Path, ...] = (), **env: str) -> dict[str, str]:
    paths = [*map(str, extra_path), str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **env}


def mergesmith(
    *args: str | Path,
    cwd: Path | None = None,
    extra_path: tuple[str | Path, ...] = (),
    timeout: float = 300,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """`mergesmith ARGS...` through the console script; output is stdout+stderr together."""
    script = shutil.which("mergesmith")
    assert script, "the mergesmith console script is not installed"
    proc = subprocess.run(
        [script, *map(str, args)],
        cwd=cwd,
        env=console_env(extra_path, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    assert "Traceback" not in proc.stdout, proc.stdout
    return proc
