"""Create a blinded reader study: pick the cases, re-encode them identically, and give each reader a seeded, balanced order."""

from __future__ import annotations

import itertools
import json
import random
import secrets
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..data.images import ImageReadError, radiograph_files, read_radiograph
from ..data.pairs import Quarantine, pairs_from_imagefolder
from ..data.phantom import CHEXPERT_LABELS
from ..data.reports import clean_report
from ..eval.labeler import label_report
from .designs import design_for
from .folder import DEFAULT_URL, write_private

STUDY_VERSION = 1
BLOCK = 5  # per source: every run of 2 x BLOCK single-case items holds BLOCK real and BLOCK synthetic ones
MIN_REPEAT_GAP = 3  # a repeated item comes back at least this many items after its first showing (when the order allows)


@dataclass
class Candidate:
    """One input case before blinding: where it came from and what it says."""

    source: str
    file: Path
    file_name: str
    text: str | None
    case_id: str = field(default_factory=lambda: "c" + secrets.token_hex(8))


def read_candidates(folder: str | Path, source: str, quarantine: Quarantine) -> list[Candidate]:
    """The cases of an imagefolder (metadata.jsonl `file_name` + `text`, as medfm.data.pairs reads it) or, without metadata, its radiographs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--{source} {folder} is not a directory")
    try:
        pairs = pairs_from_imagefolder(folder)
    except FileNotFoundError:
        return [Candidate(source, path, str(path.relative_to(folder)), None) for path in radiograph_files(folder, recursive=True)]
    candidates = []
    for pair in pairs:
        if not isinstance(pair.image, str) or not Path(pair.image).is_file():
            quarantine.add(pair.row_id, str(folder), "image file not found")
            continue
        candidates.append(Candidate(source, Path(pair.image), str(pair.metadata.get("file_name", Path(pair.image).name)), clean_report(pair.report) or None))
    return candidates


def blind_image(path: str | Path, size: int) -> Image.Image:
    """The radiograph as every case is shown: decoded (PNG 8/16-bit, JPEG, DICOM), centre-cropped to a square, resized, 8-bit gray.

    Only pixels survive: no file name, text chunk, EXIF or DICOM tag, and the same size and bit depth for both sources.
    """
    array = read_radiograph(path)
    image = Image.fromarray(np.round(array * 255).astype(np.uint8), mode="L")
    return ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)


def save_blinded(image: Image.Image, path: Path) -> None:
    """Uncompressed PNG, no metadata: with equal sizes every case file has the same number of bytes."""
    Image.frombytes("L", image.size, image.tobytes()).save(path, format="PNG", compress_level=0)


def _sample(candidates: list[Candidate], count: int | None, rng: random.Random) -> list[Candidate]:
    return rng.sample(candidates, min(count, len(candidates))) if count is not None else list(candidates)


def select_items(design: str, reports: bool, real: list[Candidate], synthetic: list[Candidate], num_cases: int | None,
                 rng: random.Random) -> list[list[Candidate]]:
    """The items (each a list of cases shown together): single cases balanced between sources, or pairs for one prompt/radiograph."""
    if design == "pairwise":
        groups = defaultdict(list)
        for candidate in real + synthetic:  # two reports for one radiograph (same file_name), or two images for one prompt
            key = candidate.file_name if reports else candidate.text
            if key:
                groups[key].append(candidate)
        pairs = [list(pair) for key in sorted(groups) for pair in itertools.combinations(groups[key], 2)]
        if not pairs:
            what = "two reports with the same file_name" if reports else "two images with the same prompt (metadata.jsonl `text`)"
            raise ValueError(f"pairwise study: no pairs found; it needs {what} across --real/--synthetic")
        return _sample(pairs, num_cases, rng)
    if design == "turing" and not (real and synthetic):
        raise ValueError("turing study: both --real and --synthetic must hold readable cases")
    if real and synthetic:
        num_cases = min(len(real), len(synthetic), num_cases or len(real) + len(synthetic))
    return [[c] for c in _sample(real, num_cases, rng) + _sample(synthetic, num_cases, rng)]


def reader_order(items: list[dict], sources: dict[str, str], repeats: int, rng: random.Random) -> list[dict]:
    """One reader's blinded order: balanced blocks of real and synthetic items, pair sides balanced, `repeats` items shown twice."""
    by_source = defaultdict(list)
    for item in items:
        by_source[sources[item["id"]]].append(item)
    for group in by_source.values():
        rng.shuffle(group)
    order = []
    while any(by_source.values()):
        block = [group.pop() for group in by_source.values() for _ in range(min(BLOCK, len(group)))]
        rng.shuffle(block)
        order.extend(block)
    swaps = [i % 2 == 1 for i in range(len(order))]  # half the pairs show their first case on the right
    rng.shuffle(swaps)
    entries = [{"item": item["id"], "cases": item["cases"][::-1] if swap and len(item["cases"]) == 2 else list(item["cases"]), "repeat": False}
               for item, swap in zip(order, swaps)]
    picks = [entry for pair in itertools.zip_longest(*[[e for e in entries if sources[e["item"]] == s] for s in sorted(by_source)])
             for entry in pair if entry][: max(0, min(repeats, len(entries)))]
    rng.shuffle(picks)
    for entry in picks:
        first = next(i for i, e in enumerate(entries) if e["item"] == entry["item"])
        position = rng.randint(min(first + 1 + MIN_REPEAT_GAP, len(entries)), len(entries))
        entries.insert(position, {**entry, "repeat": True})
    return entries


def offered_findings(texts: list[str | None], findings: list[str] | None) -> list[str]:
    """The findings a rating asks about: `findings` when given, else those the prompts name (medfm's labeler), else all 14."""
    if findings:
        unknown = [f for f in findings if f not in CHEXPERT_LABELS]
        if unknown:
            raise ValueError(f"--findings: unknown {unknown}; choose from {list(CHEXPERT_LABELS)}")
        return list(findings)
    named = {label for text in texts if text for label, value in label_report(text).items() if value == 1.0}
    return [label for label in CHEXPERT_LABELS if label in named] or list(CHEXPERT_LABELS)


def positive_labels(text: str | None) -> list[str]:
    return [label for label, value in label_report(text).items() if value == 1.0] if text else []


def create_study(output: str | Path, real: str | Path | None, synthetic: str | Path, design: str, readers: list[str], reports: bool = False,
                 repeats: int = 0, seed: int = 0, size: int = 512, num_cases: int | None = None, findings: list[str] | None = None,
                 url: str = DEFAULT_URL) -> Path:
    """Write a study folder (see the module docstring) and return it."""
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty: choose a new study folder (answers of an existing study are never overwritten)")
    if len(set(readers)) != len(readers) or not readers:
        raise ValueError(f"--readers: give one or more distinct names (got {readers})")
    design_for(design, reports)
    rng = random.Random(seed)
    quarantine = Quarantine()
    real_cases = read_candidates(real, "real", quarantine) if real else []
    synthetic_cases = read_candidates(synthetic, "synthetic", quarantine)
    if reports:
        for candidate in real_cases + synthetic_cases:
            if not candidate.text:
                quarantine.add(f"{candidate.source}:{candidate.file_name}", candidate.source, "--reports: no report text (metadata.jsonl `text`)")
        real_cases, synthetic_cases = ([c for c in group if c.text] for group in (real_cases, synthetic_cases))
    items = select_items(design, reports, real_cases, synthetic_cases, num_cases, rng)

    (output / "cases").mkdir(parents=True)
    (output / "private").mkdir(mode=0o700)
    cases, key, images = {}, {}, {}
    for case in tqdm([c for item in items for c in item], desc="Blinding cases", unit="case"):
        if case.case_id in cases:
            continue
        image_key = case.file_name if reports else case.case_id  # reports on one radiograph share its image
        if image_key not in images:
            image_id = "c" + secrets.token_hex(8)
            try:
                save_blinded(blind_image(case.file, size), output / "cases" / f"{image_id}.png")
            except ImageReadError as err:
                quarantine.add(f"{case.source}:{case.file_name}", case.source, str(err))
                continue
            images[image_key] = image_id
        cases[case.case_id] = {"image": f"cases/{images[image_key]}.png", "report": case.text if reports else None}
        key[case.case_id] = {"source": case.source, "file": str(case.file), "file_name": case.file_name, "prompt": case.text,
                             "labels": positive_labels(case.text)}
    items = [item for item in items if all(c.case_id in cases for c in item)]
    if not items:
        raise ValueError(f"no readable cases; see {output / 'private' / 'skipped.jsonl'}")
    study_items = [{"id": item[0].case_id if len(item) == 1 else "p" + secrets.token_hex(8), "cases": [c.case_id for c in item],
                    "prompt": item[0].text if design == "pairwise" and not reports else None} for item in items]
    sources = {i["id"]: "/".join(sorted({key[c]["source"] for c in i["cases"]})) for i in study_items}
    study = {
        "version": STUDY_VERSION, "design": design, "reports": reports, "seed": seed, "size": size, "repeats": repeats, "readers": readers,
        "findings": offered_findings([key[c]["prompt"] for c in cases], findings) if design == "rating" else [],
        "cases": dict(sorted(cases.items())),  # sorted by random id: the order tells nothing of the source
        "items": {i["id"]: {"cases": i["cases"], "prompt": i["prompt"]} for i in sorted(study_items, key=lambda i: i["id"])},
        "orders": {name: reader_order(study_items, sources, repeats, random.Random(f"{seed}/{name}")) for name in readers},
    }
    (output / "study.json").write_text(json.dumps(study, indent=1))
    write_private(output / "private", key, {name: secrets.token_urlsafe(16) for name in readers}, url)
    quarantine.write(output / "private" / "skipped.jsonl")
    return output
