"""A model's JSON files (config.json, the weight index, adapter_config.json), read with one clear
MergeError naming the file. Below both `sources.model` and `sources.hub`, which read them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergesmith.errors import MergeError


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergeError("file not found", str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MergeError(f"not valid JSON: {err}", str(path)) from None
