"""The files beside the weights: config.json, tokenizer, generation config, recipe copy."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from mergesmith.sources import arch

TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def write_config(directory: Path, donor_config: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(donor_config)
    for key, value in updates.items():
        arch.set_dotted(config, key, value)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def copy_tokenizer(directory: Path, donor_dir: Path) -> list[str]:
    """Copy the donor's tokenizer files as they are; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (donor_dir / name).is_file():
            shutil.copyfile(donor_dir / name, directory / name)
            copied.append(name)
    return copied


def copy_generation_config(directory: Path, donor_dir: Path) -> bool:
    if (donor_dir / "generation_config.json").is_file():
        shutil.copyfile(donor_dir / "generation_config.json", directory / "generation_config.json")
        return True
    return False
