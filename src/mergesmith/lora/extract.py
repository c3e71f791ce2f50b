"""`extract-lora`: the difference between a fine-tune and its base, as a peft LoRA adapter.

Tensors stream one at a time from both models (either may itself be `base+adapter`); each
factorable weight gets one float32 SVD. The result is written atomically with a per-module report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mergesmith.lora.builder import AdapterBuilder, ExtractOptions, ModuleReport
from mergesmith.lora.kinds import module_kinds, ties_head
from mergesmith.output.staging import StagedOutput
from mergesmith.sources.model import load_model_info
from mergesmith.sources.reader import open_source
from mergesmith.sources.refs import parse_ref

log = logging.getLogger("mergesmith")


@dataclass
class ExtractSummary:
    out: Path
    modules: list[ModuleReport]
    skipped: list[str]
    seconds: float
    warnings: list[str]

    def lines(self) -> list[str]:
        factored = [m for m in self.modules if m.kind != "full"]
        lines = [f"{m.module:48} {m.kind:9} rank {m.rank:4}  rel. error {m.error:.3e}" for m in factored]
        lines += [f"{m.module:48} kept whole (modules_to_save)" for m in self.modules if m.kind == "full"]
        lines += [f"warning: {w}" for w in self.warnings]
        if self.skipped:
            lines.append(f"skipped (--skip-undecomposable): {', '.join(self.skipped)}")
        worst = max((m.error for m in factored), default=0.0)
        lines.append(
            f"extracted {len(factored)} LoRA modules (max rank {max((m.rank for m in factored), default=0)},"
            f" worst rel. error {worst:.3e}) in {self.seconds:.1f} s -> {self.out}"
        )
        return lines


def extract_lora(
    model: str,
    base_model: str,
    out: str | Path,
    options: ExtractOptions,
    *,
    overwrite: bool = False,
    cache_dir: str | None = None,
    command_line: str = "",
    progress: Callable[[str], None] | None = None,
) -> ExtractSummary:
    start = time.perf_counter()
    staged = StagedOutput(Path(out), overwrite)
    staged.check()
    ft_ref, base_ref = parse_ref(model, "--model"), parse_ref(base_model, "--base-model")
    ft, base = load_model_info(ft_ref, cache_dir), load_model_info(base_ref, cache_dir)
    builder = AdapterBuilder(options, module_kinds(base.config), tied=ties_head(base.config, base.tensors))
    ft_source, base_source = open_source(ft), open_source(base)
    directory = staged.begin()
    try:
        for name in ft.tensors:
            value = ft_source.get(name)
            if not value.is_floating_point():
                continue
            builder.add(name, value, base_source.get(name) if name in base.tensors else None)
            if progress is not None:
                progress(name)
        reports = builder.save(directory, str(base_ref))
        (directory / "README.md").write_text(readme(str(ft_ref), str(base_ref), command_line))
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    warnings = builder.warnings
    for w in warnings:
        log.warning(w)
    return ExtractSummary(staged.out, reports, builder.skipped, time.perf_counter() - start, warnings)


def readme(model: str, base: str, command_line: str) -> str:
    return (
        f"---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- mergesmith\n- lora\n---\n\n"
        f"# LoRA extracted by mergesmith\n\nThe difference between `{model}` and `{base}`, as a LoRA adapter"
        f" of `{base}` (truncated SVD per module; `lora_report.json` lists each module's rank and relative"
        f" error).\n\n```sh\n{command_line}\n```\n"
    )
