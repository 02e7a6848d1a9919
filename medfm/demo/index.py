"""The adapter index the demo offers: adapters/index.yaml (name, task, adapter folder or Hub id, description)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

TASKS = ("text-to-image", "report")
REPO_INDEX = Path(__file__).resolve().parents[2] / "adapters" / "index.yaml"


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    task: str
    adapter: str  # a local folder (resolved against the index file's folder) or a Hub id
    description: str = ""


def default_index() -> Path:
    """$MEDFM_DEMO_INDEX when set, else the repository's adapters/index.yaml (the adapters shipped with medfm)."""
    return Path(os.environ.get("MEDFM_DEMO_INDEX") or REPO_INDEX)


def load_index(path: str | Path | None = None) -> list[AdapterEntry]:
    """The entries of an index file; a relative `adapter` that exists next to the index is a local folder, else a Hub id."""
    path = Path(path or default_index())
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter index not found; pass --index FILE (a YAML list under `adapters:`, see adapters/index.yaml)")
    with open(path, encoding="utf-8") as f:
        rows = (yaml.safe_load(f) or {}).get("adapters") or []
    entries = []
    for i, row in enumerate(rows):
        missing = [key for key in ("name", "task", "adapter") if not row.get(key)]
        if missing:
            raise ValueError(f"{path}: entry {i + 1} lacks {', '.join(missing)} (each entry needs name, task and adapter)")
        if row["task"] not in TASKS:
            raise ValueError(f"{path}: entry {i + 1} ({row['name']}) has task {row['task']!r}; use one of {', '.join(TASKS)}")
        local = path.parent / row["adapter"]
        adapter = str(local.resolve()) if local.exists() else row["adapter"]
        entries.append(AdapterEntry(row["name"], row["task"], adapter, row.get("description", "")))
    if not entries:
        raise ValueError(f"{path}: no adapters listed under `adapters:`")
    return entries
