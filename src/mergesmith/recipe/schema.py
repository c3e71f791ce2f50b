"""The YAML recipe schema (mergekit's, plus `input_model_parameters`), as pydantic models.

Unknown keys are kept, as mergekit's models keep going without them; `recipe/leniency.py` reports
each with its YAML path and a suggestion (an error with `--strict`). Keys mergekit declares and
ignores (`residual_weight`) are fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergesmith.dtypes import DTYPE_ALIASES
from mergesmith.errors import MergeError, did_you_mean
from mergesmith.methods.registry import INTERNAL

DTYPES = {"bfloat16", "float16", "float32", "float64", "int64"}

ModelRefLike = str | dict[str, Any]
ModelT = TypeVar("ModelT", bound=BaseModel)
Params = dict[str, Any]


class RecipeModel(BaseModel):
    """A schema level: unknown keys are allowed (kept in `model_extra`) and reported, never refused."""

    model_config = ConfigDict(extra="allow", frozen=True)


class InputModel(RecipeModel):
    model: ModelRefLike
    parameters: Params | None = None


class SliceSource(RecipeModel):
    model: ModelRefLike
    layer_range: tuple[int, int]
    parameters: Params | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class OutputSlice(RecipeModel):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: ModelRefLike | None = None
    parameters: Params | None = None
    residual_weight: float | None = None  # accepted and ignored, as mergekit does

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"all sources of a slice must cover the same number of layers, got {sorted(lengths)}")
        return self


class ModuleSpec(RecipeModel):
    slices: list[OutputSlice] | None = None
    models: list[InputModel] | None = None
    parameters: Params | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModuleSpec:
        if bool(self.slices) == bool(self.models):
            raise ValueError("a module needs exactly one of 'slices' or 'models'")
        return self


class TokenizerConfig(RecipeModel):
    source: ModelRefLike = "union"
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


class CalibrationConfig(RecipeModel):
    """Data for the data-aware methods (regmean, fisher): each model's own prompts (calibration/)."""

    data: dict[str, str]  # model reference -> JSONL file, one {"prompt": ...} or {"text": ...} per line
    samples: int = Field(128, ge=1)
    max_length: int = Field(256, ge=1)
    cache: str | None = None  # where statistics are kept (default ~/.cache/mergesmith/calibration)


class MergeConfig(RecipeModel):
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, ModuleSpec] | None = None
    base_model: ModelRefLike | None = None
    parameters: Params | None = None
    input_model_parameters: dict[str, Params] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: ModelRefLike | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    name: str | None = None  # a stage name in multi-stage recipes
    post: list[Any] | None = None  # post-steps on the merged task vector (recipe/post.py)
    calibration: CalibrationConfig | None = None  # statistics for regmean / fisher

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return v
        name = v.removeprefix("torch.")
        name = DTYPE_ALIASES.get(name, name)
        if name not in DTYPES:
            raise ValueError(f"unknown dtype '{v}'{did_you_mean(name, DTYPES)} (known: {', '.join(sorted(DTYPES))})")
        return name

    @field_validator("merge_method")
    @classmethod
    def _public_method(cls, v: str) -> str:
        if v in INTERNAL:  # its plans come from a command (`mergesmith moe`), which knows its inputs' layout
            raise ValueError(f"'{v}' is internal to mergesmith (its commands plan it); see `mergesmith methods`")
        return v

    @model_validator(mode="after")
    def _shape(self) -> MergeConfig:
        given = [k for k in ("models", "slices", "modules") if getattr(self, k)]
        if len(given) != 1:
            near = "".join(
                f" ('{k}' is not a key{hint})"
                for k in self.model_extra or {}
                if (hint := did_you_mean(str(k), ("models", "slices", "modules")))
            )
            raise ValueError(f"a recipe needs exactly one of 'models', 'slices' or 'modules'{near}")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either 'tokenizer_source' or a 'tokenizer' block, not both")
        return self


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not part.startswith(("function-", "tagged-", "str", "dict[")):
            out += f".{part}" if out else part
    return out


def _model_for_loc(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at `loc` (to suggest its field names)."""
    current: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return current if hasattr(current, "model_fields") else None
        annotation = fields[part].annotation
        current = _first_model(annotation)
        if current is None:
            return None
    return current if hasattr(current, "model_fields") else None


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def validation_error_to_merge_error(err: ValidationError, root: type[BaseModel], source: str) -> MergeError:
    """One message listing every problem, each with its YAML path and a suggestion."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = _loc_to_path(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            owner = _model_for_loc(root, loc)
            choices = list(owner.model_fields) if owner else []
            key = str(loc[-1])
            lines.append(f"{path}: unknown key '{key}'{did_you_mean(key, choices)}")
        elif e["type"] == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: {msg}")
    # Unions report one error per alternative; keep each message once.
    unique = list(dict.fromkeys(lines))
    return MergeError("invalid recipe:\n  " + "\n  ".join(unique), source)


def validate_mapping(model: type[ModelT], data: Any, source: str, what: str = "a recipe") -> ModelT:
    """`data` (parsed YAML) as `model`, or one MergeError listing every problem with its YAML path."""
    if not isinstance(data, dict):
        raise MergeError(f"{what} must be a YAML mapping, got {type(data).__name__}", source)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error_to_merge_error(err, model, source) from None


def parse_config(data: Any, source: str = "recipe") -> MergeConfig:
    return validate_mapping(MergeConfig, data, source)


def load_yaml(path: str | Path) -> Any:
    return read_yaml(path)[0]


def read_yaml(path: str | Path) -> tuple[Any, str]:
    """The parsed YAML of a file and its raw text (kept verbatim in outputs), reading it once."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeError("recipe file not found", str(p)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise MergeError(f"cannot read recipe: {err}", str(p)) from None
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as err:
        raise MergeError(f"not valid YAML: {err}", str(p)) from None


def load_config(path: str | Path) -> tuple[MergeConfig, str]:
    """Parse a recipe file; returns the config and its raw text (kept verbatim in the output)."""
    data, text = read_yaml(path)
    return parse_config(data, str(path)), text
