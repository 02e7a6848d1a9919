"""Readers' preferences as training pairs: pairwise answers, and ratings (best vs worst case of one prompt or radiograph).

Formats (JSONL, one pair a line; image paths are relative to the JSONL file and point to the study's re-encoded PNGs,
copied into a folder beside it, so the export carries pixels only):
- reports, TRL's vision preference format: {"images": [radiograph], "prompt": instruction, "chosen": report, "rejected": report}
- images, for Diffusion-DPO: {"prompt": text, "chosen": image path, "rejected": image path}
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..config import DEFAULT_INSTRUCTION
from .folder import load_study
from .results import answer_rows


def _pairwise(rows: list[dict]) -> tuple[list[tuple[str, str]], int]:
    """(chosen case, rejected case) of each reader's first answer to a pair; ties are skipped and counted."""
    pairs, ties = [], 0
    for row in rows:
        if row["repeat"]:
            continue
        if row["preference"] == "equal":
            ties += 1
            continue
        chosen = "AB".index(row["preference"])
        pairs.append((row["cases"][chosen], row["cases"][1 - chosen]))
    return pairs, ties


def _best_vs_worst(rows: list[dict], group_of) -> tuple[list[tuple[str, str]], int]:
    """Per prompt (or radiograph): the case with the highest mean of realism and plausibility over readers vs the lowest."""
    scores = defaultdict(list)
    for row in rows:
        if not row["repeat"]:
            scores[row["cases"][0]].append((row["realism"] + row["plausibility"]) / 2)
    groups = defaultdict(list)
    for case, values in scores.items():
        groups[group_of(case)].append((float(np.mean(values)), case))
    pairs, ties = [], 0
    for key, cases in groups.items():
        if key is None or len(cases) < 2:
            continue
        cases.sort()
        if cases[0][0] == cases[-1][0]:
            ties += 1
            continue
        pairs.append((cases[-1][1], cases[0][1]))
    return pairs, ties


def export_preferences(folder: str | Path, output: str | Path, instruction: str = DEFAULT_INSTRUCTION) -> dict:
    """Write the study's preference pairs to `output` (JSONL) and its images beside it; returns counts of pairs and skipped ties."""
    folder, output = Path(folder), Path(output)
    study = load_study(folder)
    if study["design"] == "turing":
        raise ValueError(f"{folder}: a turing study's answers (real or synthetic?) are not preferences; export reads pairwise and rating studies")
    rows = answer_rows(folder)
    cases = study["cases"]
    prompt_of = {case: row["prompt"] for row in rows for case in row["cases"]}  # the two images of a pair share their prompt
    if study["design"] == "pairwise":
        pairs, ties = _pairwise(rows)
    else:
        pairs, ties = _best_vs_worst(rows, (lambda c: cases[c]["image"]) if study["reports"] else prompt_of.get)
    image_dir = output.parent / f"{output.stem}_images"
    image_dir.mkdir(parents=True, exist_ok=True)

    def image(case: str) -> str:
        source = folder / cases[case]["image"]
        shutil.copyfile(source, image_dir / source.name)
        return f"{image_dir.name}/{source.name}"

    with open(output, "w", encoding="utf-8") as f:
        for chosen, rejected in pairs:
            if study["reports"]:
                row = {"images": [image(chosen)], "prompt": instruction, "chosen": cases[chosen]["report"], "rejected": cases[rejected]["report"]}
            else:
                row = {"prompt": prompt_of[chosen], "chosen": image(chosen), "rejected": image(rejected)}
            f.write(json.dumps(row) + "\n")
    return {"pairs": len(pairs), "ties_skipped": ties, "output": str(output), "images": str(image_dir)}
