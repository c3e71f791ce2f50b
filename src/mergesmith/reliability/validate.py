"""Checking a recipe before any weights are read: every problem at once, each with its YAML path
and a suggestion, plus the plan summary and estimates of memory, disk and bytes to read.

Only metadata is touched: config.json files, safetensors headers, index files (a `.bin` input is
opened through the weights-only loader, which is the only way to learn its tensor names). For a hub id
only those small files are fetched, and safetensors headers are read with HTTP range requests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mergesmith.errors import MergeError
from mergesmith.methods.registry import MergeMethod, get_method
from mergesmith.plan import Plan, parse_block, plan_merge
from mergesmith.recipe.leniency import Ignored, check_recipe, parameter_blocks
from mergesmith.recipe.schema import MergeConfig, load_yaml, validation_error_to_merge_error
from mergesmith.sources import arch
from mergesmith.sources.model import ModelInfo, load_model_metadata
from mergesmith.sources.refs import ModelRef, parse_ref
from mergesmith.sources.structure import find_structure

BASELINE_RAM = 400_000_000  # the Python process with torch loaded
SIDE_FILES = ("config.json", "generation_config.json", *(f"tokenizer{s}" for s in (".json", "_config.json", ".model")))

SUGGESTIONS = (
    ("unknown merge method", "`mergesmith methods` lists the methods"),
    ("unknown parameter", "`mergesmith methods NAME` lists a method's parameters"),
    ("unknown dtype", "use one of the dtypes listed"),
    ("(--strict)", "fix or remove it, or run without --strict (mergekit ignores it)"),
    ("unknown key", "see the recipe reference in the README"),
    ("required key is missing", "add the key; see the recipe reference in the README"),
    ("model directory not found", "check the path (relative paths are relative to where you run mergesmith)"),
    ("revision '", "check the branch, tag or commit after '@' (it must exist in the hub repository)"),
    ("hugging face hub", "check the hub id, your network and your token (huggingface-cli login)"),
    ("layer_range", "a layer range is [start, end) with end at most the model's layer count"),
    ("different layer counts", "use 'slices' with a layer_range per model"),
    ("shape mismatch", "merge models of one architecture and size (fine-tunes of the same base)"),
    ("needs a base_model", "add 'base_model: <model>' to the recipe"),
    ("needs parameter", "set it under 'parameters' (top level or per model)"),
    ("model(s) besides the base", "`mergesmith methods NAME` says how many models it takes"),
    ("no tensor", "the base model must have the tensors of the models merged onto it"),
    ("lora adapter", "reference an adapter as 'base_model+adapter_dir'"),
    ("not valid json", "the file is damaged: download it again"),
    ("corrupt", "the file is damaged: download it again"),
    ("truncated", "the file is incomplete: download it again"),
    ("missing", "download the missing file(s) again"),
    ("refused to load", "convert the checkpoint to safetensors from a source you trust"),
    ("not valid yaml", "fix the YAML syntax (indentation, brackets, quotes)"),
    ("yaml mapping", "a recipe is a mapping with merge_method and models/slices/modules"),
    ("expected", "see the recipe reference in the README"),
)


def suggest(message: str) -> str:
    low = message.lower()
    for marker, hint in SUGGESTIONS:
        if marker in low:
            return hint
    return "see docs/reliability.md"


@dataclass(frozen=True)
class Problem:
    where: str
    message: str
    suggestion: str

    def line(self) -> str:
        """One printable line (multi-line YAML errors are joined; odd characters in keys escaped)."""
        return f"{one_line(self.where)}: {one_line(self.message)} -> {self.suggestion}"


def one_line(text: str) -> str:
    text = re.sub(r"\s*\n\s*", " ", text.strip())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or "''"


@dataclass
class Estimate:
    bytes_read: int
    disk: int
    peak_ram: int
    peak_vram: int | None
    whole: list[str] = field(default_factory=list)  # which tensors need whole tensors in memory, and why

    def lines(self) -> list[str]:
        gb = 1e9
        out = [
            f"bytes to read: {self.bytes_read / gb:.3f} GB; disk needed: {self.disk / gb:.3f} GB",
            f"peak RAM (estimate): {self.peak_ram / gb:.3f} GB",
        ]
        if self.peak_vram is not None:
            out.append(f"peak VRAM (estimate): {self.peak_vram / gb:.3f} GB")
        return out + self.whole


@dataclass
class Validation:
    source: str
    problems: list[Problem] = field(default_factory=list)
    plan: Plan | None = None
    estimate: Estimate | None = None
    ignored: list[Ignored] = field(default_factory=list)  # keys and parameters mergekit would ignore

    def add(self, where: str, message: str) -> None:
        problem = Problem(where or self.source, message, suggest(message))
        if problem not in self.problems:
            self.problems.append(problem)

    def guard(self, where: str, step: Callable[[], Any], keep_where: bool = False) -> Any:
        """Run one check; a MergeError (or any unexpected error) becomes a problem, never a traceback.

        `keep_where`: report under `where` (the YAML path), naming the error's own file in the message."""
        try:
            return step()
        except MergeError as err:
            if keep_where and err.where and err.where != where:
                self.add(where, f"{err.message}: {err.where}")
            else:
                self.add(err.where or where, err.message)
        except Exception as err:  # a validator reports; it never crashes on a strange recipe
            self.add(where, f"cannot check this ({type(err).__name__}: {err})")
        return None


def validate_recipe(
    path: str | Path, *, cache_dir: str | None = None, cuda: bool = False, strict: bool = False
) -> Validation:
    v = Validation(str(path))
    data = v.guard(str(path), lambda: load_yaml(path))
    if v.problems:
        return v
    if not isinstance(data, dict):
        v.add(str(path), f"a recipe must be a YAML mapping, got {type(data).__name__}")
        return v
    config = v.guard(str(path), lambda: _schema(data, str(path), v))
    readable = config if config is not None else _without_bad_keys(data)
    if readable is not None:
        v.ignored = check_recipe(readable)
        if strict:
            for f in v.ignored:
                if f.level == "warning":
                    v.add(f.where, f"{f.message} (--strict)")
    method = None
    if isinstance(data.get("merge_method"), str):
        method = v.guard("merge_method", lambda: get_method(data["merge_method"]))
    models: dict[str, ModelInfo] = {}
    for where, raw in _model_entries(data):
        ref = v.guard(where, lambda raw=raw, where=where: parse_ref(raw, where))
        if ref is not None and ref.key not in models:
            info = v.guard(where, lambda ref=ref: load_model_metadata(ref, cache_dir), keep_where=True)
            if info is not None:
                models[ref.key] = info
    if config is None or method is None or v.problems:
        return v
    before = len(v.problems)
    _check_parameters(config, method, v)
    _check_ranges(data, models, v)
    _check_shapes(data, models, v)
    plan = v.guard("(recipe)", lambda: plan_merge(config, models))
    if plan is not None and len(v.problems) == before:
        v.plan = plan
        v.estimate = estimate(plan, models, cuda)
    return v


def _schema(data: dict[str, Any], source: str, v: Validation) -> MergeConfig | None:
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as err:
        text = validation_error_to_merge_error(err, MergeConfig, source).message
        for line in text.splitlines()[1:]:
            where, _, message = line.strip().partition(": ")
            v.add(where, message)
    return None


def _without_bad_keys(data: dict[str, Any]) -> MergeConfig | None:
    """The recipe less the top-level keys with schema errors, to list ignored keys beside them."""
    try:
        MergeConfig.model_validate(data)
    except ValidationError as err:
        bad = {e["loc"][0] for e in err.errors() if e["loc"]}
        try:
            return MergeConfig.model_validate({k: val for k, val in data.items() if k not in bad})
        except ValidationError:
            return None
    return None


def _model_entries(data: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(YAML path, reference) of every model the raw recipe names, read tolerantly."""
    if data.get("base_model") is not None:
        yield "base_model", data["base_model"]
    blocks = [("", data)]
    modules = data.get("modules")
    if isinstance(modules, dict):
        blocks += [(f"modules.{k}.", m) for k, m in modules.items() if isinstance(m, dict)]
    for prefix, block in blocks:
        for i, entry in enumerate(_list(block.get("models"))):
            if isinstance(entry, dict) and "model" in entry:
                yield f"{prefix}models[{i}].model", entry["model"]
        for i, s in enumerate(_list(block.get("slices"))):
            if not isinstance(s, dict):
                continue
            if s.get("base_model") is not None:
                yield f"{prefix}slices[{i}].base_model", s["base_model"]
            for j, src in enumerate(_list(s.get("sources"))):
                if isinstance(src, dict) and "model" in src:
                    yield f"{prefix}slices[{i}].sources[{j}].model", src["model"]


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _check_parameters(config: MergeConfig, method: MergeMethod, v: Validation) -> None:
    """Every parameter block, so each bad value is reported, not just the first."""
    for where, raw, _ in parameter_blocks(config):
        v.guard(where, lambda raw=raw, where=where: parse_block(raw, where, method))


def _info(data_ref: Any, models: dict[str, ModelInfo]) -> ModelInfo | None:
    try:
        ref: ModelRef = parse_ref(data_ref, "")
    except MergeError:
        return None
    return models.get(ref.key)


def _slices(data: dict[str, Any]) -> Iterator[tuple[str, str | None, dict[str, Any]]]:
    """(YAML path, module or None for top-level slices, slice) of every slice."""
    blocks: list[tuple[str, str | None, Any]] = [("", None, data)]
    blocks += [(f"modules.{k}.", k, m) for k, m in (data.get("modules") or {}).items()]
    for prefix, module, block in blocks:
        for i, s in enumerate(block.get("slices") or []):
            yield f"{prefix}slices[{i}]", module, s


def _check_ranges(data: dict[str, Any], models: dict[str, ModelInfo], v: Validation) -> None:
    for where, module, s in _slices(data):
        for j, src in enumerate(s["sources"]):
            info = _info(src["model"], models)
            if info is None:
                continue
            structure = find_structure(info.config, info.tensors)
            if module is None:  # top-level slices count the text decoder (or the only stack)
                stack = structure.stack_of("text_decoder") or (
                    structure.stacks[0] if len(structure.stacks) == 1 else None
                )
                if stack is None and structure.stacks:
                    continue  # several stacks and no text decoder: the plan asks for 'modules:'
            else:
                stack = structure.stack_of(module)
            n = stack.layers if stack is not None else 0
            a, b = src["layer_range"]
            if b > n:
                what = f" ({stack.module})" if stack is not None and stack.module != "default" else ""
                v.add(
                    f"{where}.sources[{j}].layer_range",
                    f"layer_range [{a}, {b}] goes beyond the model{what}, which has {n} layers",
                )


def _check_shapes(data: dict[str, Any], models: dict[str, ModelInfo], v: Validation) -> None:
    """For a whole-model merge: every tensor template whose shape differs between models, once each."""
    infos = [(i, info) for i, m in enumerate(data.get("models") or []) if (info := _info(m["model"], models))]
    if data.get("base_model") is not None and (base := _info(data["base_model"], models)) is not None:
        infos.append((-1, base))
    if len(infos) < 2:
        return
    seen: set[str] = set()
    first_i, first = infos[0]
    for name, meta in first.tensors.items():
        p = arch.parse_layer_name(name)
        template = p.rest if p else name
        if template in seen or arch.is_embedding(name):  # vocabulary differences are handled, with a warning
            continue
        for i, info in infos[1:]:
            other = info.tensors.get(name)
            if other is not None and other.shape != meta.shape:
                seen.add(template)
                where = "base_model" if i < 0 else f"models[{i}].model"
                v.add(
                    where,
                    f"shape mismatch with models[{first_i}]: {name} is {list(other.shape)} here,"
                    f" {list(meta.shape)} there",
                )
                break


def estimate(plan: Plan, models: dict[str, ModelInfo], cuda: bool) -> Estimate:
    """Peak memory of the streaming executor: the chunks in flight of a streamed tensor, or a whole
    tensor's float32 inputs, result and output copy where its method needs whole tensors
    (`engine.footprint`), on top of the process itself. Inputs are memory-mapped, not counted."""
    from mergesmith.engine.footprint import footprint
    from mergesmith.engine.schedule import size

    work = 0  # the largest working set of one output tensor
    host = 0  # with --cuda the host holds only the result on its way to the writer
    whole: dict[str, tuple[int, int, str]] = {}  # reason -> (tensors, bytes of the largest, its name)
    for t in plan.tensors:
        f = footprint(t)
        work = max(work, f.bytes)
        host = max(host, t.nbytes)
        if f.whole is not None:
            count, largest, name = whole.get(f.whole, (0, -1, ""))
            whole[f.whole] = (count + 1, *max((largest, name), (f.bytes, t.name)))
    donor = models.get(plan.donor)
    side = 0
    if donor is not None:
        side = sum((donor.directory / n).stat().st_size for n in SIDE_FILES if (donor.directory / n).is_file())
    header = sum(
        len(json.dumps({"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [0, 0]})) + len(t.name)
        for t in plan.tensors
    )
    disk = plan.bytes_written + header + side
    notes = [
        f"whole tensors: {count} tensor(s) are merged whole ({why}); the largest, {name}, needs"
        f" ~{size(largest)}, so memory grows with the tensor size"
        for why, (count, largest, name) in whole.items()
    ]
    if cuda:
        return Estimate(plan.bytes_read, disk, BASELINE_RAM + host, work, notes)
    return Estimate(plan.bytes_read, disk, BASELINE_RAM + work, None, notes)


def summary_line(plan: Plan) -> str:
    gb = 1e9
    return (
        f"plan: {plan.method}, {len(plan.tensors)} output tensors, read {plan.bytes_read / gb:.3f} GB,"
        f" write {plan.bytes_written / gb:.3f} GB; config.json from {plan.donor}"
        + (f", updates {plan.config_updates}" if plan.config_updates else "")
    )
