"""Results files of the benchmarks (one markdown file, one section per setup, re-runs replace their own section) and
the runner that measures arms against each other."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_section(path: Path, header: str, title: str, body: str) -> None:
    """Replace section `title` of `path` in place (keeping the others and their order; a new one goes last) with `body` and
    the command that produced it."""
    sections = {}
    if path.exists():
        for block in path.read_text().split("\n## ")[1:]:
            name, _, text = block.partition("\n")
            sections[name.strip()] = text.strip()
    script = os.path.relpath(sys.argv[0], Path(__file__).resolve().parents[1])
    command = " ".join(["python", script, *sys.argv[1:]])
    sections[title] = f"Reproduce: `{command}`\n\n{body}"
    path.write_text(header.strip() + "\n" + "".join(f"\n## {name}\n\n{text}\n" for name, text in sections.items()))


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


def medians(runs: dict[str, list[dict]], keys) -> dict[str, dict]:
    """Each arm's median of each measure over its runs; None where the arm does not measure it (CUDA memory on a CPU)."""
    return {arm: {key: statistics.median(r[key] for r in rs) if rs[0][key] is not None else None for key in keys} for arm, rs in runs.items()}


def arms_table(runs: dict[str, list[dict]], labels: dict[str, str], measures: dict[str, tuple[str, str]], rate: str, reference: str) -> list[str]:
    """The arms side by side (medians over their runs) as markdown table rows: first the `rate` measure with the range seen, then
    each arm's rate as a ratio to the `reference` arm's, then the other measures (those the reference measured)."""
    median, arms = medians(runs, measures), list(runs)
    label, fmt = measures[rate]
    lines = ["| | " + " | ".join(labels[arm] for arm in arms) + " |", "|---" * (len(arms) + 1) + "|"]
    lines.append(f"| {label} | " + " | ".join(
        f"{fmt.format(median[arm][rate])} ({fmt.format(min(r[rate] for r in runs[arm]))}–{fmt.format(max(r[rate] for r in runs[arm]))})"
        for arm in arms) + " |")
    lines.append(f"| {label.partition(' (')[0]} vs {reference} | " + " | ".join(
        f"**{median[arm][rate] / median[reference][rate]:.2f}x**" for arm in arms) + " |")
    for key, (label, fmt) in measures.items():
        if key != rate and median[reference][key] is not None:
            lines.append(f"| {label} | " + " | ".join(fmt.format(median[arm][key]) for arm in arms) + " |")
    return lines


def write_runs_json(path: str | Path, machine: str, args, runs: dict[str, list[dict]], table: str) -> None:
    """Every run of every arm, the arguments and the table, for more than the medians."""
    Path(path).write_text(json.dumps({"machine": machine, "args": vars(args), "runs": runs, "table": table}, indent=1, default=str))


def launch(flags: list[str]) -> float:
    """One training run (`recipes/train_lora.py FLAGS`, from the repository root) through accelerate launch; returns its wall-clock seconds."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "recipes/train_lora.py", *flags]
    print("+", " ".join(command[2:]), file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return time.perf_counter() - start
