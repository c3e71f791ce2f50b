"""The model card (README.md) that the Hugging Face hub shows for a merged model."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergesmith.methods.registry import MergeMethod
from mergesmith.sources.refs import ModelRef, parse_ref

INTRO = (
    "This is a merge of pre-trained language models created with [mergesmith](https://pypi.org/project/mergesmith/)."
)


def is_hub_id(ref: ModelRef) -> bool:
    path = ref.path
    return not path.startswith(("/", "~", ".")) and path.count("/") <= 1 and not Path(path).exists()


def hub_ids(refs: Iterable[ModelRef]) -> list[str]:
    ids: dict[str, None] = {}
    for ref in refs:
        for part in (ref, ref.lora):
            if part is not None and is_hub_id(part):
                ids.setdefault(part.path)
    return list(ids)


def read_license(directory: Path) -> str | None:
    """An input's license: its card's front matter `license:`, else a `license` key in config.json."""
    readme = directory / "README.md"
    if readme.is_file():
        front = front_matter(readme.read_text(encoding="utf-8", errors="replace"))
        if isinstance(front.get("license"), str):
            return front["license"]
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("license") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def agreed_license(directories: Iterable[Path]) -> str | None:
    """The license every input declares, or None when one is silent or two differ."""
    found = {read_license(d) for d in directories}
    return found.pop() if len(found) == 1 and None not in found else None


def front_matter(text: str) -> dict:
    """The YAML between the leading `---` lines of a card ({} when absent or unreadable)."""
    if not text.startswith("---"):
        return {}
    parts = text.split("\n---", 1)
    if len(parts) < 2:
        return {}
    try:
        data = yaml.safe_load(parts[0].removeprefix("---"))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class StageSummary:
    """One stage of a multi-stage merge, for the card's stage graph."""

    name: str
    method: MergeMethod
    base: str | None  # display form: a stage name or a model reference
    inputs: list[str]  # display forms of the other inputs


def model_card(
    name: str,
    method: MergeMethod,
    base: ModelRef | None,
    refs: list[ModelRef],
    recipe: str,
    *,
    license: str | None = None,
    stages: list[StageSummary] | None = None,
) -> str:
    """The card: front matter, method with its paper, inputs, stage graph (multi-stage), recipe."""
    front: dict[str, object] = {}
    ids = hub_ids(refs)
    if ids:
        front["base_model"] = ids
    if license:
        front["license"] = license
    front["library_name"] = "transformers"
    front["tags"] = ["merge", "mergesmith"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", f"# {name}", "", INTRO]
    lines += ["", "## Merge details", "", "### Merge method", ""]
    link = _method_link(method)
    if stages:
        lines.append(f"This model was merged in {len(stages)} stages; the last one used the {link} merge method.")
    elif base is not None and method.name != "slerp":
        lines.append(f"This model was merged using the {link} merge method using {_show(base)} as a base.")
    else:
        lines.append(f"This model was merged using the {link} merge method.")
    if stages:
        lines += ["", "### Stages", "", *stage_graph(stages)]
    lines += ["", "### Models merged", "", "The following models were included in the merge:"]
    for ref in refs:
        if stages or base is None or ref.key != base.key:
            lines.append(f"* {_show(ref)}")
    lines += ["", *configuration_section(recipe, "model", "###")]
    return "\n".join(lines)


def configuration_section(recipe: str, product: str, heading: str) -> list[str]:
    """The card's recipe: a `heading` Configuration section with the YAML that produced the `product`."""
    return [
        f"{heading} Configuration",
        "",
        f"The following YAML configuration was used to produce this {product}:",
        "",
        "```yaml",
        recipe.rstrip(),
        "```",
        "",
    ]


def stage_graph(stages: list[StageSummary]) -> list[str]:
    """Stages in the order they ran, then the same graph as a mermaid flowchart."""
    lines = []
    for i, s in enumerate(stages, 1):
        inputs = ", ".join(f"`{x}`" for x in s.inputs) or "-"
        based = f" with base `{s.base}`" if s.base else ""
        lines.append(f"{i}. **{s.name}**: {_method_link(s.method)} of {inputs}{based}")
    ids: dict[str, str] = {}

    def node(label: str) -> str:
        if label not in ids:
            ids[label] = f"n{len(ids)}"
        return ids[label]

    edges = []
    for s in stages:
        for x in ([s.base] if s.base else []) + s.inputs:
            edges.append(f"  {node(x)} --> {node(s.name)}")
    labels = [f'  {i}["{label.replace(chr(34), "")}"]' for label, i in ids.items()]
    return [*lines, "", "```mermaid", "graph LR", *labels, *edges, "```"]


def _method_link(method: MergeMethod) -> str:
    return f"[{method.pretty}]({method.paper})" if method.paper else method.pretty


def _show(ref: ModelRef) -> str:
    return f"[{ref.path}](https://huggingface.co/{ref.path})" if is_hub_id(ref) else str(ref)


def moe_model_card(name: str, family: str, config: Any, recipe: str) -> str:
    """Card of a mixture of experts: the base, each expert with its prompts, the config verbatim."""
    refs = [parse_ref(config.base_model, "base_model")]
    groups = [("Experts", config.experts), ("Shared experts", config.shared_experts or [])]
    refs += [parse_ref(e.source_model, "source_model") for _, group in groups for e in group]
    front: dict[str, object] = {}
    ids = hub_ids(refs)
    if ids:
        front["base_model"] = ids
    front["library_name"] = "transformers"
    front["tags"] = ["moe", "merge", "mergesmith"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", f"# {name}", ""]
    lines.append(
        f"This is a {family} mixture of experts built from dense models with"
        " [mergesmith](https://pypi.org/project/mergesmith/) `moe`."
    )
    lines += [
        "",
        f"Attention, norms and embeddings come from {_show(refs[0])}. Routing: gate mode `{config.gate_mode}`,"
        f" {config.experts_per_token} experts per token.",
    ]
    for title, group in groups:
        if not group:
            continue
        lines += ["", f"## {title}", ""]
        for i, e in enumerate(group):
            lines.append(f"{i}. {_show(parse_ref(e.source_model, 'source_model'))}")
            for label, prompts in (("positive prompts", e.positive_prompts), ("negative prompts", e.negative_prompts)):
                if prompts:
                    lines.append(f"   - {label}: " + "; ".join(f"`{p}`" for p in prompts))
    lines += ["", "## Configuration", "", "```yaml", recipe.rstrip(), "```", ""]
    return "\n".join(lines)
