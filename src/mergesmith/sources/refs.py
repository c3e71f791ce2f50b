"""Model references: `org/name`, `/local/dir`, `name@revision`, `base+lora`, and the mapping form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mergesmith.errors import MergeError


@dataclass(frozen=True)
class ModelRef:
    path: str
    revision: str | None = None
    lora: ModelRef | None = None
    override_architecture: str | None = None

    def __str__(self) -> str:
        s = self.path + (f"@{self.revision}" if self.revision else "")
        return s + (f"+{self.lora}" if self.lora else "")

    @property
    def key(self) -> str:
        """Identity of the reference inside one recipe."""
        return str(self) + (f"#{self.override_architecture}" if self.override_architecture else "")


def _parse_part(text: str, where: str) -> ModelRef:
    if text.count("@") > 1:
        raise MergeError(f"model reference '{text}' has more than one '@revision'", where)
    path, _, revision = text.partition("@")
    if not path:
        raise MergeError(f"model reference '{text}' has an empty path", where)
    return ModelRef(path=path, revision=revision or None)


def parse_ref(value: Any, where: str) -> ModelRef:
    """Parse a string or mapping model reference, naming `where` in errors."""
    if isinstance(value, ModelRef):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.count("+") > 1:
            raise MergeError(f"model reference '{text}' has more than one '+adapter'", where)
        base, _, lora = text.partition("+")
        ref = _parse_part(base, where)
        if lora:
            ref = ModelRef(ref.path, ref.revision, _parse_part(lora, where))
        return ref
    if isinstance(value, dict):
        unknown = set(value) - {"model", "lora", "override_architecture"}
        if unknown or "model" not in value:
            raise MergeError(
                "a model mapping needs 'model: {path, revision}' and optionally 'lora' and 'override_architecture'",
                where,
            )
        model = _parse_mapping_part(value["model"], f"{where}.model")
        lora = _parse_mapping_part(value["lora"], f"{where}.lora") if value.get("lora") else None
        return ModelRef(model.path, model.revision, lora, value.get("override_architecture"))
    raise MergeError(f"expected a model reference, got {value!r}", where)


def _parse_mapping_part(value: Any, where: str) -> ModelRef:
    if isinstance(value, str):
        return _parse_part(value, where)
    if isinstance(value, dict) and "path" in value and set(value) <= {"path", "revision"}:
        return ModelRef(str(value["path"]), value.get("revision"))
    raise MergeError("expected {path, revision?}", where)
