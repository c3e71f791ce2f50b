"""Multi-stage merges: several recipes in one YAML file, where a stage's name stands for its output.

Each YAML document is a recipe with a `name`; at most one document has none, and it is the final
merge (written to `--out-path`). A model reference equal to a stage name means that stage's output
directory `<intermediate-dir>/<name>`. Only model references are rewritten (the keys listed in
`ref_sites`), so a stage named `linear` leaves `merge_method: linear` alone and a literal chat
template full of `+` and `@` is never parsed as a model. Stages run in dependency order; unknown
stage names and cycles are reported before any stage runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergesmith.errors import MergeError, did_you_mean
from mergesmith.output.card import StageSummary
from mergesmith.recipe.schema import MergeConfig, parse_config
from mergesmith.sources.refs import parse_ref

log = logging.getLogger("mergesmith")

FINAL = ""  # the key of the unnamed (final) document
TOKENIZER_KEYWORDS = {"union", "base"}


@dataclass
class Stage:
    name: str  # FINAL for the unnamed document
    index: int  # 0-based position of the YAML document
    raw: dict[str, Any]  # the document as written
    recipe: dict[str, Any]  # with stage references rewritten to directories
    config: MergeConfig
    out: Path
    depends: dict[str, str] = field(default_factory=dict)  # stage name -> YAML key that references it

    @property
    def label(self) -> str:
        return self.name or "final"

    @property
    def text(self) -> str:
        """The recipe this stage runs, as YAML (written into its output as mergesmith_config.yml)."""
        return yaml.safe_dump(self.recipe, sort_keys=False, allow_unicode=True)


@dataclass
class MultiRecipe:
    source: str
    text: str
    stages: list[Stage]  # in run order

    def where(self, stage: Stage, key: str = "") -> str:
        who = f"'{stage.name}'" if stage.name else "unnamed"
        return f"{self.source} document {stage.index + 1} ({who})" + (f" {key}" if key else "")


# ---------------------------------------------------------------------------------------------
# Model reference sites


Site = tuple[dict[str, Any], str, str]  # (container, key, YAML path)


def ref_sites(doc: dict[str, Any]) -> Iterator[Site]:
    """Every place in a recipe that holds a model reference (and nothing else)."""
    if doc.get("base_model") is not None:
        yield doc, "base_model", "base_model"
    source = doc.get("tokenizer_source")
    if source is not None and source not in TOKENIZER_KEYWORDS:
        yield doc, "tokenizer_source", "tokenizer_source"
    tok = doc.get("tokenizer")
    if isinstance(tok, dict):
        if tok.get("source") is not None and tok["source"] not in TOKENIZER_KEYWORDS:
            yield tok, "source", "tokenizer.source"
        for token, spec in (tok.get("tokens") or {}).items() if isinstance(tok.get("tokens"), dict) else ():
            if not isinstance(spec, dict):
                continue
            src = spec.get("source")
            where = f"tokenizer.tokens.{token}.source"
            if isinstance(src, str):
                yield spec, "source", where
            elif isinstance(src, dict) and src.get("kind") == "model_token" and src.get("model") is not None:
                yield src, "model", f"{where}.model"
    blocks: list[tuple[str, Any]] = [("", doc)]
    if isinstance(doc.get("modules"), dict):
        blocks += [(f"modules.{name}.", m) for name, m in doc["modules"].items() if isinstance(m, dict)]
    for prefix, block in blocks:
        for i, entry in enumerate(_list(block.get("models"))):
            if isinstance(entry, dict) and "model" in entry:
                yield entry, "model", f"{prefix}models[{i}].model"
        for i, sl in enumerate(_list(block.get("slices"))):
            if not isinstance(sl, dict):
                continue
            if sl.get("base_model") is not None:
                yield sl, "base_model", f"{prefix}slices[{i}].base_model"
            for j, src in enumerate(_list(sl.get("sources"))):
                if isinstance(src, dict) and "model" in src:
                    yield src, "model", f"{prefix}slices[{i}].sources[{j}].model"


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def stage_of(value: Any, stages: set[str], where: str) -> str | None:
    """The stage a model reference names (its base part), or None."""
    if isinstance(value, str):
        path = value.strip().partition("+")[0].partition("@")[0]
        return path if path in stages else None
    if isinstance(value, dict):
        model = value.get("model")
        if isinstance(model, str):
            return stage_of(model, stages, where)
        if isinstance(model, dict) and isinstance(model.get("path"), str):
            return model["path"] if model["path"] in stages else None
    return None


def point_at(value: Any, directory: str, where: str) -> Any:
    """`value` (a reference whose base part is a stage) with that base replaced by the stage's directory."""
    if isinstance(value, dict):
        model = value["model"]
        if isinstance(model, str):
            return {**value, "model": point_at(model, directory, where)}
        if model.get("revision"):
            raise MergeError("a stage output has no revisions", where)
        return {**value, "model": {**model, "path": directory}}
    base, plus, lora = value.strip().partition("+")
    if "@" in base:
        raise MergeError(f"'{base}' names a stage, and a stage output has no revisions", where)
    return directory + plus + lora


def check_not_a_typo(value: Any, stages: set[str], where: str) -> None:
    """A bare name (no `/`, not a local path) one typo away from a stage name is an unknown stage."""
    try:
        ref = parse_ref(value, where)
    except MergeError:
        return  # malformed references are reported by the recipe's own validation
    path = ref.path
    if "/" in path or path.startswith((".", "~")) or Path(path).exists():
        return
    hint = did_you_mean(path, stages)
    if hint:
        raise MergeError(f"unknown stage '{path}'{hint} (stages: {', '.join(sorted(stages))})", where)


def rewrite(doc: dict[str, Any], dirs: dict[str, str], where: Callable[[str], str]) -> tuple[dict, dict[str, str]]:
    """A deep copy of `doc` with stage references pointing at their directories, and its dependencies."""
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(doc))  # a deep copy made of plain YAML values
    names = set(dirs)
    depends: dict[str, str] = {}
    for container, key, path in list(ref_sites(out)):
        stage = stage_of(container[key], names, where(path))
        if stage is None:
            check_not_a_typo(container[key], names, where(path))
            continue
        depends.setdefault(stage, path)
        container[key] = point_at(container[key], dirs[stage], where(path))
    imp = out.get("input_model_parameters")
    if isinstance(imp, dict):
        rebuilt = {}
        for ref, params in imp.items():
            path = f"input_model_parameters.{ref}"
            stage = stage_of(ref, names, where(path)) if isinstance(ref, str) else None
            if stage is None:
                rebuilt[ref] = params
                continue
            depends.setdefault(stage, path)
            rebuilt[point_at(ref, dirs[stage], where(path))] = params
        out["input_model_parameters"] = rebuilt
    return out, depends


# ---------------------------------------------------------------------------------------------
# Loading


def load_multi(path: str | Path, intermediate_dir: str | Path, out_path: str | Path | None) -> MultiRecipe:
    """Parse, rewrite and order every stage; every error is raised here, before anything runs."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeError("recipe file not found", str(p)) from None
    return parse_multi(text, str(p), intermediate_dir, out_path)


def parse_multi(text: str, source: str, intermediate_dir: str | Path, out_path: str | Path | None) -> MultiRecipe:
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        raise MergeError(f"not valid YAML: {err}", source) from None
    inter = Path(intermediate_dir).expanduser().resolve()
    named: dict[str, int] = {}
    unnamed: list[int] = []
    entries: list[tuple[int, dict[str, Any]]] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue  # an empty document (a trailing `---`)
        if not isinstance(doc, dict):
            raise MergeError(f"a recipe must be a YAML mapping, got {type(doc).__name__}", f"{source} document {i + 1}")
        name = doc.get("name")
        if name is None:
            unnamed.append(i)
        elif not isinstance(name, str) or not name.strip() or "/" in name or name in (".", ".."):
            raise MergeError(f"a stage name must be a plain name, got {name!r}", f"{source} document {i + 1} name")
        elif name in named:
            raise MergeError(
                f"stage name '{name}' is used twice (documents {named[name] + 1} and {i + 1})",
                f"{source} document {i + 1} name",
            )
        else:
            named[name] = i
        entries.append((i, doc))
    if not entries:
        raise MergeError("no recipes in this file", source)
    if len(unnamed) > 1:
        raise MergeError(
            "only the final recipe may be unnamed, but documents "
            + ", ".join(str(i + 1) for i in unnamed)
            + " have no 'name'",
            source,
        )
    if unnamed and out_path is None:
        raise MergeError(f"document {unnamed[0] + 1} has no name, so it is the final merge: give --out-path", source)
    if not unnamed and out_path is not None:
        raise MergeError("--out-path is for the unnamed (final) document, and every document here is named", source)
    dirs = {name: str(inter / name) for name in named}
    stages: dict[str, Stage] = {}
    for i, doc in entries:
        name = doc.get("name") or FINAL
        who = f"'{name}'" if name else "unnamed"
        prefix = f"{source} document {i + 1} ({who})"
        recipe, depends = rewrite(doc, dirs, lambda key, prefix=prefix: f"{prefix} {key}")
        config = parse_config(recipe, prefix)
        out = Path(dirs[name]) if name else Path(str(out_path))
        stages[name] = Stage(name, i, doc, recipe, config, out, depends)
    multi = MultiRecipe(source, text, [])
    multi.stages = order(stages, multi)
    return multi


def order(stages: dict[str, Stage], multi: MultiRecipe) -> list[Stage]:
    """Dependency order (document order among independent stages, the final one last); cycles raise."""
    done: dict[str, None] = {}
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = visiting[visiting.index(name) :] + [name]
            stage = stages[visiting[-1]]
            raise MergeError("stages form a cycle: " + " -> ".join(cycle), multi.where(stage, stage.depends[name]))
        visiting.append(name)
        for dep in stages[name].depends:
            visit(dep)
        visiting.pop()
        done[name] = None

    for name in sorted(stages, key=lambda n: (n == FINAL, stages[n].index)):
        visit(name)
    return [stages[n] for n in done]


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class StageResult:
    stage: Stage
    ran: bool
    reason: str  # why it ran or was skipped
    summary: Any = None  # MergeSummary when it ran


def decide(multi: MultiRecipe, lazy: bool) -> list[tuple[Stage, bool, str]]:
    """Which stages run: a complete output is reused when lazy, unless a stage it reads is rebuilt."""
    from mergesmith.output.audit import is_complete_merge

    rebuilt: set[str] = set()
    out = []
    for stage in multi.stages:
        stale = [d for d in stage.depends if d in rebuilt]
        if not lazy:
            run, why = True, "--no-lazy"
        elif stale:
            run, why = True, f"rebuilt input stage {', '.join(stale)}"
        elif is_complete_merge(stage.out):
            run, why = False, "complete output found"
        else:
            run, why = True, "no complete output"
        if run:
            rebuilt.add(stage.name)
        out.append((stage, run, why))
    return out


def run_multi(
    multi: MultiRecipe,
    options: Any,
    lazy: bool = True,
    on_stage: Callable[[Stage, bool, str], None] | None = None,
) -> list[StageResult]:
    """Run the stages in order (options: MergeOptions, applied to every stage)."""
    import dataclasses

    from mergesmith.merge import run_merge
    from mergesmith.output.audit import is_complete_merge

    results = []
    for stage, run, why in decide(multi, lazy):
        if on_stage is not None:
            on_stage(stage, run, why)
        if not run:
            recorded = stage.out / "mergesmith_config.yml"
            if recorded.is_file() and recorded.read_text(encoding="utf-8") != stage.text:
                log.warning(
                    "stage %s: reusing %s, which was made from a different recipe; pass --no-lazy to rebuild it",
                    stage.label,
                    stage.out,
                )
            results.append(StageResult(stage, False, why))
            continue
        # Stage directories belong to the multi-stage run; the final output is replaced only when the
        # user allows it or when it is a previous mergesmith merge (rebuilt because an input changed).
        ours = stage.name != FINAL or (is_complete_merge(stage.out) and (stage.out / "mergesmith_config.yml").exists())
        stage_options = dataclasses.replace(options, overwrite=options.overwrite or ours)
        if stage.name == FINAL:
            stage_options = dataclasses.replace(stage_options, write_model_card=False)
        summary = run_merge(stage.config, stage.text, stage.out, stage_options)
        if stage.name == FINAL and options.write_model_card:
            (stage.out / "README.md").write_text(final_card(multi, stage, options.transformers_cache), encoding="utf-8")
            (stage.out / "mergesmith_multi.yml").write_text(multi.text, encoding="utf-8")
        results.append(StageResult(stage, True, why, summary))
    return results


def final_card(multi: MultiRecipe, final: Stage, cache_dir: str | None = None) -> str:
    """The card of a multi-stage merge: every stage's inputs, the stage graph and the whole file."""
    from mergesmith.methods.registry import get_method
    from mergesmith.output import card
    from mergesmith.plan import referenced_models

    by_dir = {str(s.out): s.label for s in multi.stages}
    leaves: dict[str, Any] = {}
    summaries = []
    for stage in multi.stages:
        base = parse_ref(stage.config.base_model, "base_model") if stage.config.base_model is not None else None
        shown_base = None
        inputs = []
        for ref in referenced_models(stage.config):
            label = by_dir.get(ref.path)
            if label is None:
                leaves.setdefault(ref.key, ref)
            shown = label or str(ref)
            if base is not None and ref.key == base.key:
                shown_base = shown
            else:
                inputs.append(shown)
        summaries.append(StageSummary(stage.label, get_method(stage.config.merge_method), shown_base, inputs))
    # Stage outputs carry the license their own inputs agree on, so the final stage's inputs decide.
    from mergesmith.sources.model import resolve_directory

    dirs = [resolve_directory(ref, cache_dir) for ref in referenced_models(final.config)]
    licence = card.agreed_license(dirs)
    return card.model_card(
        final.out.name,
        get_method(final.config.merge_method),
        None,
        list(leaves.values()),
        multi.text,
        license=licence,
        stages=summaries,
    )
