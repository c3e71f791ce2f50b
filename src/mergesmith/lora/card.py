"""The model card (README.md) of a merge written as a LoRA adapter (`run --as-lora`), and the
one-line summary of its per-module report."""

from __future__ import annotations

import yaml

from mergesmith.lora.builder import ModuleReport
from mergesmith.output.card import INTRO, configuration_section, is_hub_id
from mergesmith.sources.refs import ModelRef


def report_summary(reports: list[ModuleReport]) -> str:
    """`N LoRA modules, rank a-b, rel. error mean x max y[, k kept whole]` over the factored modules."""
    factored = [r for r in reports if r.kind != "full"]
    whole = len(reports) - len(factored)
    kept = f", {whole} kept whole" if whole else ""
    if not factored:
        return f"0 LoRA modules{kept}"
    ranks = sorted(r.rank for r in factored)
    errors = [r.error for r in factored]
    rank = f"rank {ranks[0]}" if ranks[0] == ranks[-1] else f"rank {ranks[0]}-{ranks[-1]}"
    return (
        f"{len(factored)} LoRA modules, {rank}, rel. error mean {sum(errors) / len(errors):.3e}"
        f" max {max(errors):.3e}{kept}"
    )


def adapter_card(name: str, method: str, base: ModelRef, refs: list[ModelRef], recipe: str, summary: str) -> str:
    """Front matter (`base_model` when the base is a hub id, `library_name: peft`, tags), inputs, recipe."""
    front: dict[str, object] = {}
    if is_hub_id(base):
        front["base_model"] = base.path
    front["library_name"] = "peft"
    front["tags"] = ["merge", "mergesmith", "lora"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", f"# {name}", "", INTRO, ""]
    lines += [
        f"It is written as a LoRA adapter of `{base}`: the {method} merge of the models below, minus the base,"
        " factored per module by a truncated SVD (`lora_report.json` lists each module's rank and relative error).",
        "",
        f"Adapter: {summary}.",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{name}")',
        "```",
        "",
        "## Models merged",
        "",
        *[f"* {ref}" for ref in refs],
        "",
        *configuration_section(recipe, "adapter", "##"),
    ]
    return "\n".join(lines)
