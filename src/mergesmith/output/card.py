"""The model card (README.md) that the Hugging Face hub shows for a merged model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mergesmith.methods.registry import MergeMethod
from mergesmith.sources.refs import ModelRef, parse_ref


def is_hub_id(ref: ModelRef) -> bool:
    path = ref.path
    return not path.startswith(("/", "~", ".")) and path.count("/") <= 1 and not Path(path).exists()


def hub_ids(refs: list[ModelRef]) -> list[str]:
    ids: dict[str, None] = {}
    for ref in refs:
        for part in (ref, ref.lora):
            if part is not None and is_hub_id(part):
                ids.setdefault(part.path)
    return list(ids)


def model_card(name: str, method: MergeMethod, base: ModelRef | None, refs: list[ModelRef], recipe: str) -> str:
    front: dict[str, object] = {}
    ids = hub_ids(refs)
    if ids:
        front["base_model"] = ids
    front["library_name"] = "transformers"
    front["tags"] = ["merge", "mergesmith"]
    link = f"[{method.pretty}]({method.paper})" if method.paper else method.pretty
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", f"# {name}", ""]
    lines.append(
        "This is a merge of pre-trained language models created with [mergesmith](https://pypi.org/project/mergesmith/)."
    )
    lines += ["", "## Merge details", "", "### Merge method", ""]
    if base is not None and method.name != "slerp":
        lines.append(f"This model was merged using the {link} merge method using {_show(base)} as a base.")
    else:
        lines.append(f"This model was merged using the {link} merge method.")
    lines += ["", "### Models merged", "", "The following models were included in the merge:"]
    for ref in refs:
        if base is None or ref.key != base.key:
            lines.append(f"* {_show(ref)}")
    lines += [
        "",
        "### Configuration",
        "",
        "The following YAML configuration was used to produce this model:",
        "",
        "```yaml",
        recipe.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


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
