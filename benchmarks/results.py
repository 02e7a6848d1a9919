"""Results files of the benchmarks: one markdown file, one section per setup, re-runs replace their own section."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def write_section(path: Path, header: str, title: str, body: str) -> None:
    """Replace section `title` of `path` (keeping the others) with `body` and the command that produced it."""
    sections = {}
    if path.exists():
        for block in path.read_text().split("\n## ")[1:]:
            name, _, text = block.partition("\n")
            sections[name.strip()] = text.strip()
    script = os.path.relpath(sys.argv[0], Path(__file__).resolve().parents[1])
    command = " ".join(["python", script, *sys.argv[1:]])
    sections[title] = f"Reproduce: `{command}`\n\n{body}"
    path.write_text(header.strip() + "\n" + "".join(f"\n## {name}\n\n{text}\n" for name, text in sorted(sections.items())))
