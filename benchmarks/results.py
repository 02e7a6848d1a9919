"""Results files of the benchmarks (one markdown file, one section per setup, re-runs replace their own section) and
the runner that measures arms against each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
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


def run_in_turns(arms: list[str], repeats: int, command: list[str],
                 env_for: Callable[[str, int], dict] = lambda arm, repeat: dict(os.environ)) -> dict[str, list[dict]]:
    """Runs `command --arm ARM` for each arm in its own process (so its peak memory is its own), the arms taking turns
    `repeats` times so that a busy machine slows them alike. An arm prints its measurements as JSON on its last line."""
    runs = {arm: [] for arm in arms}
    for repeat in range(repeats):
        for arm in arms:
            print(f"Running {arm} ({repeat + 1}/{repeats}) ...", file=sys.stderr)
            out = subprocess.run([*command, "--arm", arm], env=env_for(arm, repeat), check=True, stdout=subprocess.PIPE, text=True).stdout
            runs[arm].append(json.loads(out.strip().splitlines()[-1]))
    return runs
