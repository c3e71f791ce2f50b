"""Running published recipes (tests/corpus/) on generated stand-ins of the models they name.

Every model reference in a recipe (base_model, models, slice sources, modules, tokenizer sources,
MoE experts, `base+lora` adapters) is mapped to a tiny real model: fine-tunes of one Llama-style
base deep enough for every `layer_range` the recipe reaches, and peft adapters of that base. The
recipe file itself stays as its author wrote it; the harness writes a copy with the references
replaced (names of multi-stage stages are left alone), then runs it with the installed
`mergesmith` console script. Used by tests/test_corpus.py and benchmarks/corpus.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CORPUS = Path(__file__).resolve().parent / "corpus"
MIN_LAYERS = 2


@dataclass(frozen=True)
class Recipe:
    path: Path
    kind: str  # run | moe | multi
    text: str

    @property
    def name(self) -> str:
        return self.path.stem

    def documents(self) -> list[Any]:
        return list(yaml.safe_load_all(self.text)) if self.kind == "multi" else [yaml.safe_load(self.text)]


def corpus() -> list[Recipe]:
    out = []
    for path in sorted(CORPUS.glob("[0-9]*.yml")):
        text = path.read_text(encoding="utf-8")
        kind = re.search(r"^# kind: (\w+)", text, re.M)
        out.append(Recipe(path, kind[1] if kind else "run", text))
    return out


# ---------------------------------------------------------------------------------------------
# Where a recipe names models

RefSite = tuple[Any, Any]  # (container, key): container[key] is a model reference


def ref_sites(doc: Any) -> Iterator[RefSite]:
    if not isinstance(doc, dict):
        return
    for key in ("base_model",):
        if key in doc:
            yield doc, key
    tok = doc.get("tokenizer_source")
    if isinstance(tok, str | dict) and tok not in ("union", "base"):
        yield doc, "tokenizer_source"
    block = doc.get("tokenizer")
    if isinstance(block, dict):
        if isinstance(block.get("source"), str | dict) and block.get("source") not in ("union", "base"):
            yield block, "source"
        for spec in (block.get("tokens") or {}).values():
            if isinstance(spec, dict) and isinstance(spec.get("source"), str):
                yield spec, "source"
            elif isinstance(spec, dict) and isinstance(spec.get("source"), dict) and "model" in spec["source"]:
                yield spec["source"], "model"
    parts = [doc] + [m for m in (doc.get("modules") or {}).values() if isinstance(m, dict)]
    for part in parts:
        for entry in _list(part.get("models")):
            if isinstance(entry, dict) and "model" in entry:
                yield entry, "model"
        for s in _list(part.get("slices")):
            if isinstance(s, dict):
                if "base_model" in s:
                    yield s, "base_model"
                for src in _list(s.get("sources")):
                    if isinstance(src, dict) and "model" in src:
                        yield src, "model"
    for key in ("experts", "shared_experts"):
        for e in _list(doc.get(key)):
            if isinstance(e, dict) and "source_model" in e:
                yield e, "source_model"


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def depth(docs: list[Any]) -> int:
    """Layers every stand-in needs: the largest end of any layer_range (at least MIN_LAYERS)."""
    ends = [MIN_LAYERS]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            r = node.get("layer_range")
            if isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r):
                ends.append(r[1])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(docs)
    return max(ends)


# ---------------------------------------------------------------------------------------------
# Stand-ins


class StandIns:
    """Tiny models on demand, one base per depth; each name a seeded fine-tune of it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bases: dict[int, Path] = {}
        self.models: dict[tuple[int, str], Path] = {}
        self.adapters: dict[tuple[int, str, str], Path] = {}

    def base(self, layers: int) -> Path:
        from mergesmith.toymodels import make_base

        if layers not in self.bases:
            self.bases[layers] = make_base(self.root / f"base-{layers}", layers=layers, hidden=16, vocab=64, seed=0)
        return self.bases[layers]

    def model(self, layers: int, name: str) -> Path:
        from mergesmith.toymodels import make_finetune

        key = (layers, name)
        if key not in self.models:
            seed = int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)
            self.models[key] = make_finetune(self.base(layers), self.root / f"m{len(self.models)}-{layers}", seed=seed)
        return self.models[key]

    def adapter(self, layers: int, base_name: str, name: str) -> Path:
        key = (layers, base_name, name)
        if key not in self.adapters:
            from lora_adapters import build_adapter

            out = self.root / f"lora{len(self.adapters)}-{layers}"
            build_adapter(
                self.model(layers, base_name),
                out,
                seed=len(self.adapters),
                r=2,
                lora_alpha=4,
                target_modules=["q_proj", "v_proj"],
            )
            self.adapters[key] = out
        return self.adapters[key]

    def reference(self, layers: int, ref: Any) -> Any:
        """The stand-in for one reference: a path, or `path+adapter` for a LoRA reference."""
        if isinstance(ref, dict):  # {model: {path, revision}, lora: ...} or {path, revision}
            inner = ref.get("model", ref)
            path = inner.get("path") if isinstance(inner, dict) else inner
            lora = ref.get("lora")
            lora_path = lora.get("path") if isinstance(lora, dict) else lora
            ref = f"{path}+{lora_path}" if lora_path else str(path)
        text = str(ref)
        base, plus, lora = text.partition("+")
        base = base.rsplit("@", 1)[0] if "@" in base else base
        if plus:
            lora = lora.rsplit("@", 1)[0] if "@" in lora else lora
            return f"{self.model(layers, base)}+{self.adapter(layers, base, lora)}"
        return str(self.model(layers, base))


def is_legacy_source(value: Any) -> bool:
    """`model:NAME` is mergekit 0.0.x syntax for a tokenizer source: 0.1.5 reads it as a path and fails."""
    return isinstance(value, str) and value.startswith("model:")


def stand_in(recipe: Recipe, models: StandIns) -> str | None:
    """The recipe's text with every model reference replaced, or None when it is not valid YAML."""
    try:
        docs = recipe.documents()
    except yaml.YAMLError:
        return None
    layers = depth(docs)
    stages = {d.get("name") for d in docs if isinstance(d, dict) and d.get("name")}
    for doc in docs:
        for container, key in list(ref_sites(doc)):
            value = container[key]
            if value in stages or is_legacy_source(value):
                continue
            container[key] = models.reference(layers, value)
    return (
        yaml.safe_dump_all(docs, sort_keys=False)
        if recipe.kind == "multi"
        else yaml.safe_dump(docs[0], sort_keys=False)
    )


# ---------------------------------------------------------------------------------------------
# Running


def _documents(text: str) -> list[Any]:
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return []


def console_script() -> list[str]:
    """The installed `mergesmith` script (next to this interpreter), or the module when not installed."""
    exe = Path(sys.executable).with_name("mergesmith")
    found = str(exe) if exe.exists() else shutil.which("mergesmith")
    return [found] if found else [sys.executable, "-m", "mergesmith.cli"]


@dataclass
class Outcome:
    code: int
    output: str
    out: Path

    @property
    def warnings(self) -> list[str]:
        return sorted(
            {line.removeprefix("WARNING: ") for line in self.output.splitlines() if line.startswith("WARNING: ")}
        )


def run_recipe(
    recipe: Recipe, text: str, work: Path, *flags: str, runner: Callable[..., Any] = subprocess.run
) -> Outcome:
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{recipe.name}.yml"
    path.write_text(text, encoding="utf-8")
    out = work / "out"
    if recipe.kind == "multi":
        args = ["multi", str(path), "-I", str(work / "stages")]
        if any(isinstance(d, dict) and not d.get("name") for d in _documents(text)):
            args += ["--out-path", str(out)]  # the unnamed final document's output
    else:
        args = [recipe.kind, str(path), str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = runner([*console_script(), *args, "--quiet", *flags], capture_output=True, text=True, env=env, cwd=work)
    return Outcome(done.returncode, done.stdout + done.stderr, out)
