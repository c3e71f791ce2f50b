"""merge_report.json: one JSON object in the output directory; each feature writes its own key."""

from __future__ import annotations

import json
from pathlib import Path

REPORT = "merge_report.json"


def update_report(directory: Path, key: str, value: object) -> None:
    path = Path(directory) / REPORT
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
