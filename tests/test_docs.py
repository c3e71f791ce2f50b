"""Executable documentation: every fenced `bash`/`shell`/`sh` and `yaml` example in README.md and
docs/*.md runs, so a documented command that changes without its example fails here.

An example that cannot run here carries, directly above its fence, a visible line
`*Not run by the docs test: REASON.*`; the test counts those and checks that each has a reason.
New docs are collected automatically (every `docs/*.md`).

How examples run (one session-scoped sandbox of tiny models, built once):
- YAML: a recipe (`merge_method`) is merged with `mergesmith run`, several `---` documents with
  `mergesmith multi`, `experts` with `mergesmith moe`, `layer_slices` with `mergesmith bakllama`, a
  `genome` with a two-candidate `mergesmith search`; anything else fails, asking for a marker.
  Model references (hub ids, local paths, `base+adapter`, `@revision`) are mapped to tiny models
  of one 32-layer base (a seeded fine-tune per name, a real peft adapter per adapter name). A YAML
  whose first line is a comment naming a file (`# moe.yml`) is also kept under that name for the
  shell examples that follow it in the same document.
- Shell: the block runs as a `bash -euo pipefail` script through the installed `mergesmith`
  console script, in a fresh directory holding `recipe.yml`, `genome.yml`, `moe.yml`, `qa.jsonl` and
  `mc.jsonl` (tiny models) and the models named after `--model`/`--base-model`;
  `pip install 'mergesmith[EXTRA]'` is checked against pyproject.toml's extras instead of run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import run_cli
from console import console_env

from mergesmith.toymodels import make_base, make_finetune

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = {"bash": "shell", "shell": "shell", "sh": "shell", "yaml": "yaml", "yml": "yaml"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)")
MARKER = re.compile(r"^\s*\*Not run by the docs test:(?P<reason>.*)\*\s*$")
MODEL_KEYS = {"model", "base_model", "source_model", "embedding_source", "lm_head_source"}
DEEP = 32  # layers of the models layer_slices examples take (multi.md slices up to layer 32); others have 4


@dataclass(frozen=True)
class Example:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str  # "shell" or "yaml"
    text: str
    skip: str | None  # the marker's reason, when marked

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def collect(doc: Path) -> tuple[list[Example], list[tuple[int, str]]]:
    """The runnable-language examples of `doc`, and every marker (line, reason) found in it."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    examples: list[Example] = []
    markers: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        if m := MARKER.match(lines[i]):
            markers.append((i + 1, m["reason"].strip()))
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        start, indent = i, fence["indent"]
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        lang = LANGS.get(fence["lang"].lower())
        if lang is None:
            continue
        above = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marked = MARKER.match(above)
        examples.append(
            Example(doc, start + 1, lang, "\n".join(body) + "\n", marked["reason"].strip() if marked else None)
        )
    return examples, markers


ALL: list[Example] = []
MARKERS: list[tuple[Path, int, str]] = []
for _doc in DOCS:
    _examples, _markers = collect(_doc)
    ALL += _examples
    MARKERS += [(_doc, line, reason) for line, reason in _markers]


def test_examples_are_counted_and_every_marker_has_a_reason_and_a_fence() -> None:
    run = [e for e in ALL if e.skip is None]
    marked = [e for e in ALL if e.skip is not None]
    assert len(run) >= 20, f"only {len(run)} runnable examples found: is the collector broken?"
    for doc, line, reason in MARKERS:
        assert reason.rstrip(". "), f"{doc.name}:{line}: a 'Not run by the docs test' marker without a reason"
    attached = {(e.doc, e.line) for e in marked}
    for doc, line, _ in MARKERS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        nxt = next((k + 1 for k in range(line, len(lines)) if lines[k].strip()), None)
        assert (doc, nxt) in attached, f"{doc.name}:{line}: the marker is not directly above a bash/shell/yaml fence"
    sys.stderr.write(f"docs examples: {len(run)} run, {len(marked)} marked not run\n")


# -- the sandbox ------------------------------------------------------------------------------


class Sandbox:
    """Tiny models for every name the examples use, and the files shell examples expect."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = make_base(root / "models" / "_base", layers=4, hidden=16, vocab=96, seed=0)
        self.deep = make_base(root / "models" / "_deep", layers=DEEP, hidden=16, vocab=96, seed=0)
        self.models: dict[str, Path] = {}
        self.named: dict[tuple[Path, str], str] = {}  # (doc, file name) -> YAML text kept for later examples
        self.counter = 0

    def model(self, name: str, deep: bool = False) -> Path:
        """The tiny model standing for `name` (a hub id or a local path): one seeded fine-tune per name."""
        key = name.removeprefix("./").rstrip("/") + ("#deep" if deep else "")
        if key not in self.models:
            slug = re.sub(r"[^\w.-]+", "_", key)
            base = self.deep if deep else self.base
            self.models[key] = make_finetune(base, self.root / "models" / slug, seed=zlib.crc32(key.encode()))
        return self.models[key]

    def adapter(self, base: Path, name: str) -> Path:
        from lora_adapters import build_adapter

        key = f"{base.name}+{name}"
        if key not in self.models:
            out = self.root / "adapters" / re.sub(r"[^\w.-]+", "_", key)
            build_adapter(base, out, seed=zlib.crc32(key.encode()) % 1000, r=4, target_modules=["q_proj", "v_proj"])
            self.models[key] = out
        return self.models[key]

    def ref(self, text: str, deep: bool = False) -> str:
        """A model reference of the docs mapped to the sandbox: `base@rev+adapter` -> `/dir+/adapter`."""
        base, _, adapter = text.partition("+")
        path = self.model(base.split("@")[0], deep)
        return f"{path}+{self.adapter(path, adapter)}" if adapter else str(path)

    def workdir(self, example: Example) -> Path:
        self.counter += 1
        cwd = self.root / "run" / f"{self.counter:03d}-{example.doc.stem}-{example.line}"
        cwd.mkdir(parents=True)
        return cwd

    def fixtures(self, cwd: Path, doc: Path) -> None:
        """The input files shell examples name, over tiny models (and the YAML earlier examples kept)."""
        a, b = self.model("fixture/finetune-a"), self.model("fixture/finetune-b")
        (cwd / "recipe.yml").write_text(
            yaml.safe_dump(
                {
                    "merge_method": "ties",
                    "base_model": str(self.base),
                    "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in (a, b)],
                    "dtype": "bfloat16",
                }
            )
        )
        rows = [{"prompt": "one two", "choices": ["three", "cat"], "label": 0}]
        rows += [{"prompt": "red green", "choices": ["dog", "blue"], "label": 1}]
        (cwd / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (cwd / "qa.jsonl").write_text(json.dumps({"prompt": "one two", "answer": "three"}) + "\n")
        genome = {
            "genome": {"models": [str(a), str(b)], "merge_method": "linear", "layer_granularity": 0},
            "tasks": [{"path": "mc.jsonl"}],
        }
        (cwd / "genome.yml").write_text(yaml.safe_dump(genome))
        moe = {
            "base_model": str(self.base),
            "gate_mode": "hidden",
            "experts": [
                {"source_model": str(a), "positive_prompts": ["one two three"]},
                {"source_model": str(b), "positive_prompts": ["red green blue"]},
            ],
        }
        (cwd / "moe.yml").write_text(yaml.safe_dump(moe))
        for (d, name), text in self.named.items():
            if d == doc:
                (cwd / name).write_text(text)

    def local_models(self, cwd: Path, script: str) -> None:
        """Link the local model directories a shell example passes with --model / --base-model."""
        for path in re.findall(r"--(?:base-)?model[ =](\./[\w.-]+)", script):
            link = cwd / path.removeprefix("./")
            if not link.exists():
                link.symlink_to(self.model(path))


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Sandbox:
    return Sandbox(tmp_path_factory.mktemp("docs"))


# -- running YAML -----------------------------------------------------------------------------


def map_refs(node: Any, box: Sandbox, stages: set[str], deep: bool, key: str | None = None) -> Any:
    """`node` with every model reference replaced by the sandbox's tiny model (stage names kept)."""
    if isinstance(node, dict):
        return {k: map_refs(v, box, stages, deep, k) for k, v in node.items()}
    if isinstance(node, list):
        return [map_refs(v, box, stages, deep, key) for v in node]
    if isinstance(node, str) and key in MODEL_KEYS | {"models"} and node not in stages:
        return box.ref(node, deep)
    return node


def _reach(node: Any) -> int:
    """The largest end of any `layer_range` in `node` (slices up to it need the 32-layer models)."""
    if isinstance(node, dict):
        r = node.get("layer_range")
        own = r[1] if isinstance(r, list) and len(r) == 2 and isinstance(r[1], int) else 0
        return max([own, *(_reach(v) for v in node.values())])
    if isinstance(node, list):
        return max([0, *(_reach(v) for v in node)])
    return 0


def run_yaml(example: Example, box: Sandbox) -> None:
    documents = [d for d in yaml.safe_load_all(example.text) if d is not None]
    assert documents, "an empty YAML example"
    stages = {d["name"] for d in documents if isinstance(d, dict) and "name" in d}
    mapped = [map_refs(d, box, stages, isinstance(d, dict) and "layer_slices" in d or _reach(d) > 4) for d in documents]
    text = "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in mapped)
    first = example.text.lstrip().splitlines()[0]
    if m := re.fullmatch(r"#\s*([\w.-]+\.ya?ml)\s*", first):
        box.named[(example.doc, m[1])] = text
    cwd = box.workdir(example)
    path = cwd / "example.yml"
    path.write_text(text)
    doc = mapped[0]
    if len(mapped) > 1:
        args = ["multi", path, "-I", cwd / "stages", "--out-path", cwd / "out"]
    elif "merge_method" in doc:
        args = ["run", path, cwd / "out"]
    elif "experts" in doc:
        args = ["moe", path, cwd / "out"]
    elif "layer_slices" in doc:
        args = ["bakllama", path, cwd / "out"]
    elif "genome" in doc:
        args = ["search", path, "--storage-path", cwd / "search", "--max-evals", "2", "--optimizer", "random"]
    else:
        pytest.fail(
            f"{example.id}: no rule to run this YAML; mark it `*Not run by the docs test: REASON.*` "
            "or teach tests/test_docs.py its kind"
        )
    result = run_cli(*args, *([] if args[0] == "bakllama" else ["--quiet"]))
    assert result.exit_code == 0, f"{example.id}: mergesmith {args[0]} failed:\n{result.output}"
    if args[0] != "search":
        assert (cwd / "out" / "config.json").is_file(), result.output


# -- running shell ----------------------------------------------------------------------------

PIP_SHIM = r"""
pip() {  # the docs' `pip install 'mergesmith[EXTRA]'`: check that the extra exists, install nothing
  python3 - "$@" <<'PY'
import os, re, sys, tomllib
extras = tomllib.load(open(os.environ["DOCS_PYPROJECT"], "rb"))["project"]["optional-dependencies"]
asked = [m for a in sys.argv[1:] for m in re.findall(r"mergesmith\[([\w,-]+)\]", a)]
if not asked:
    sys.exit("the docs test runs no pip install but mergesmith's extras: " + " ".join(sys.argv[1:]))
for group in asked:
    for extra in group.split(","):
        if extra not in extras:
            sys.exit(f"pyproject.toml declares no extra '{extra}' (it has {sorted(extras)})")
PY
}
"""


def run_shell(example: Example, box: Sandbox) -> None:
    cwd = box.workdir(example)
    box.fixtures(cwd, example.doc)
    box.local_models(cwd, example.text)
    script = "set -euo pipefail\n" + PIP_SHIM + example.text
    env = console_env(DOCS_PYPROJECT=str(ROOT / "pyproject.toml"), HF_HUB_OFFLINE="1")
    mergesmith = shutil.which("mergesmith")
    assert mergesmith, "the mergesmith console script is not installed"
    env["PATH"] = os.pathsep.join([str(Path(mergesmith).parent), env.get("PATH", "")])
    proc = subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{example.id} (in {cwd}) exited {proc.returncode}:\n{proc.stdout}"
    assert "Traceback" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("example", ALL, ids=[e.id for e in ALL])
def test_doc_example_runs(example: Example, sandbox: Sandbox) -> None:
    if example.skip is not None:
        pytest.skip(f"marked in the docs: {example.skip}")
    (run_yaml if example.lang == "yaml" else run_shell)(example, sandbox)
