"""An input file truncated by another process during a merge: one error naming the file, the
output left staged (never a SIGBUS, never a half-written OUT).

The merge runs in a child process (a SIGBUS there cannot take pytest down); its progress callback,
called after each output tensor, truncates an input file that the merge has already opened and
mapped, as `cp` over it or a second download would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from console import console_env

CHILD = """
import os, sys
from pathlib import Path
from mergesmith.errors import MergeError
from mergesmith.merge import MergeOptions, run_merge
from mergesmith.recipe.schema import load_config

recipe, out, victim = sys.argv[1:4]
done = []

def progress(tensor):
    if not done:
        done.append(tensor.name)
        os.truncate(victim, os.path.getsize(victim) // 3)

config, text = load_config(recipe)
try:
    run_merge(config, text, out, MergeOptions(out_shard_size=10**9), progress=progress)
except MergeError as err:
    print(f"error: {err}")
    sys.exit(2)
print("merged")
"""

RECIPES = {  # by lane: fused kernels, raw streamed (pruning), torch, the writer's byte copy, dtype rounding
    "linear": "merge_method: linear\nmodels: [{model: FT1, parameters: {weight: 0.5}}, {model: FT2, parameters: {weight: 0.5}}]",
    "ties": "merge_method: ties\nbase_model: BASE\nparameters: {weight: 0.5, density: 0.5}\nmodels: [{model: FT1}, {model: FT2}]",
    "slerp": "merge_method: slerp\nbase_model: BASE\nparameters: {t: 0.3}\nmodels: [{model: BASE}, {model: FT1}]",
    "passthrough": "merge_method: passthrough\nmodels: [{model: FT1}]",
    "bf16 linear": "merge_method: linear\ndtype: bfloat16\nparameters: {weight: 0.5}\nmodels: [{model: FT1}, {model: FT2}]",
}


def recipe(text: str, inputs: dict[str, Path]) -> str:
    for key, path in inputs.items():
        text = text.replace(key.upper(), str(path))
    return text


@pytest.mark.parametrize("name", list(RECIPES))
def test_truncated_input_is_one_error_naming_the_file(name: str, tmp_path: Path, models: dict[str, Path]) -> None:
    inputs = {}
    for key in ("base", "ft1", "ft2"):  # private copies: the test truncates one
        inputs[key] = tmp_path / key
        inputs[key].mkdir()
        for f in models[key].iterdir():
            (inputs[key] / f.name).write_bytes(f.read_bytes())
    victim = inputs["ft1"] / "model.safetensors"
    (tmp_path / "r.yml").write_text(recipe(RECIPES[name], inputs))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "r.yml"), str(out), str(victim)],
        env=console_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)  # -7 would be SIGBUS
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert line.startswith(f"error: {victim}: "), line
    assert "truncated or replaced" in line, line
    assert not out.exists()
    staging = tmp_path / ".out.mergesmith-partial"
    assert staging.is_dir()
    assert f"the unfinished output is kept in {staging}" in proc.stderr
    assert os.path.getsize(victim) < (models["ft1"] / "model.safetensors").stat().st_size
