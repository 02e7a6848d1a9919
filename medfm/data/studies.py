"""Imaging studies for report generation: one report, one or more images (frontal + lateral), an optional indication.

Layouts on top of pairs.py's: R2Gen-style `annotation.json` (IU X-Ray, MIMIC-CXR splits) and the
MIMIC-CXR-JPG tree (split CSV + per-study report .txt files).
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .images import ImageReadError, read_radiograph
from .pairs import VALIDATION_SPLITS, BadRow, Quarantine, image_problem, load_pairs, screen_rows
from .reports import clean_report, select_section, split_sections

INDICATION_COLUMN_GUESSES = ("indication", "clinical_history", "history", "reason_for_exam")
FRONTAL_FIRST = {"PA": 0, "AP": 1, "LATERAL": 2, "LL": 3}
MIMIC_SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
MIMIC_METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv"


@dataclass
class Study:
    row_id: str
    images: list[str | bytes]
    report: str
    indication: str | None = None
    metadata: dict = field(default_factory=dict)


def indication_of(report: str) -> str | None:
    """The indication / clinical history section of a full report, if it has one."""
    sections = split_sections(report)
    text = next((sections[k] for k in ("indication", "indications", "clinical history", "history", "reason for exam") if sections.get(k)), None)
    return clean_report(text) or None


def is_r2gen_annotation(path: str | Path) -> bool:
    return Path(path).suffix == ".json"


def studies_from_r2gen(annotation_file: str | Path, image_root: str | Path | None = None, split: str = "train") -> list[Study]:
    """R2Gen's `annotation.json`: {"train": [{"id", "report", "image_path": [...]}, ...], "val": [...], "test": [...]}.

    Image paths are relative to `image_root` (default: the `images/` folder beside the file, else the file's folder).
    """
    annotation_file = Path(annotation_file)
    with open(annotation_file, encoding="utf-8") as f:
        annotation = json.load(f)
    split = _find_split(split, annotation.keys(), annotation_file)
    if image_root is None:
        image_root = annotation_file.parent / "images" if (annotation_file.parent / "images").is_dir() else annotation_file.parent
    studies = []
    for entry in annotation[split]:
        paths = entry.get("image_path") or []
        paths = [paths] if isinstance(paths, str) else paths
        studies.append(Study(str(entry.get("id", entry.get("study_id"))), [str(Path(image_root) / p) for p in paths],
                             entry.get("report", ""), entry.get("indication"), {"split": split}))
    return studies


def _find_split(split: str, available, source) -> str:
    candidates = VALIDATION_SPLITS if split in VALIDATION_SPLITS else (split,)
    for name in candidates:
        if name in available:
            return name
    raise ValueError(f"{source}: no split {split!r}; splits are {sorted(available)}")


def _read_csv(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _find_file(root: Path, name: str) -> Path | None:
    return next((p for p in (root / name, root / f"{name}.gz") if p.is_file()), None)


def is_mimic_cxr_root(root: str | Path) -> bool:
    return _find_file(Path(root), MIMIC_SPLIT_FILE) is not None


def studies_from_mimic_cxr(root: str | Path, split: str = "train", reports_dir: str | Path | None = None) -> list[Study]:
    """MIMIC-CXR-JPG: `mimic-cxr-2.0.0-split.csv[.gz]` + `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`, reports as
    `files/pXX/pSUBJECT/sSTUDY.txt` under `reports_dir` (default: `root`). Frontal views come first when the
    metadata CSV is present. A study whose report file is missing keeps an empty report (quarantined later).
    """
    root = Path(root)
    reports_dir = Path(reports_dir) if reports_dir else root
    rows = _read_csv(_find_file(root, MIMIC_SPLIT_FILE))
    split = _find_split(split, {row["split"] for row in rows}, root / MIMIC_SPLIT_FILE)
    metadata_file = _find_file(root, MIMIC_METADATA_FILE)
    views = {row["dicom_id"]: row.get("ViewPosition", "") for row in _read_csv(metadata_file)} if metadata_file else {}
    by_study: dict[str, list[dict]] = {}
    for row in rows:
        if row["split"] == split:
            by_study.setdefault(row["study_id"], []).append(row)
    studies = []
    for study_id, images in by_study.items():
        subject = images[0]["subject_id"]
        relative = Path("files") / f"p{subject[:2]}" / f"p{subject}"
        images.sort(key=lambda r: FRONTAL_FIRST.get(views.get(r["dicom_id"], ""), len(FRONTAL_FIRST)))
        report_file = next((p for p in (reports_dir / relative / f"s{study_id}.txt", reports_dir / relative.relative_to("files") / f"s{study_id}.txt")
                            if p.is_file()), None)
        report = report_file.read_text(encoding="utf-8") if report_file else ""
        studies.append(Study(f"s{study_id}", [str(root / relative / f"s{study_id}" / f"{r['dicom_id']}.jpg") for r in images], report,
                             indication_of(report), {"split": split, "views": [views.get(r["dicom_id"], "") for r in images]}))
    return studies


def load_studies(train_data_dir=None, train_data_file=None, dataset_name=None, dataset_config_name=None, image_column=None,
                 caption_column=None, image_root=None, indication_column=None, split="train", reports_dir=None,
                 phantom_num_images=256) -> list[Study]:
    """Studies from whichever source is given; the layouts of pairs.py become one-image studies."""
    if train_data_file and is_r2gen_annotation(train_data_file):
        return studies_from_r2gen(train_data_file, image_root, split)
    if train_data_dir and is_mimic_cxr_root(train_data_dir):
        return studies_from_mimic_cxr(train_data_dir, split, reports_dir)
    pairs = load_pairs(train_data_dir, train_data_file, dataset_name, dataset_config_name, image_column, caption_column,
                       image_root, phantom_num_images, split=split)
    studies = []
    for pair in pairs:
        column = indication_column or next((c for c in INDICATION_COLUMN_GUESSES if pair.metadata.get(c)), None)
        indication = pair.metadata.get(column) if column else None
        studies.append(Study(pair.row_id, [pair.image] if pair.image is not None else [], pair.report or "",
                             indication or indication_of(pair.report or ""), pair.metadata))
    return studies


def to_pil_rgb(array) -> Image.Image:
    """A [0, 1] grayscale radiograph as the 8-bit RGB image processors expect."""
    return Image.fromarray(np.round(np.asarray(array) * 255).astype(np.uint8), mode="L").convert("RGB")


class ReportStudyDataset(Dataset):
    """Studies checked up front (images present and readable, report section non-empty), served as
    {"images": [PIL RGB, ...], "report": target text, "indication": str | None}."""

    def __init__(self, studies: list[Study], report_section: str = "findings", max_images: int = 1,
                 quarantine: Quarantine | None = None, verify_images: bool = True):
        self.quarantine = quarantine or Quarantine()
        self.max_images = max_images
        texts = [select_section(study.report, report_section) for study in studies]

        def problem(i: int) -> str | None:
            images = studies[i].images[:max_images]
            if not images:
                return "no image given"
            image_reason = next((r for r in (image_problem(im, _study_source(studies[i], im), verify_images) for im in images) if r), None)
            return image_reason or (None if texts[i] else f"empty report (no text in section {report_section!r})")

        good = screen_rows(len(studies), problem, lambda i: (studies[i].row_id, _study_source(studies[i])), self.quarantine)
        self.rows = [(studies[i], texts[i]) for i in good]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        study, text = self.rows[index]
        try:
            images = [to_pil_rgb(read_radiograph(image, name=_study_source(study, image))) for image in study.images[: self.max_images]]
        except ImageReadError as err:  # broke after the up-front check: skipped, recorded by the training loop
            return {"bad_row": BadRow(study.row_id, _study_source(study), str(err))}
        return {"row_id": study.row_id, "images": images, "report": text, "indication": study.indication}


def _study_source(study: Study, image=None) -> str:
    image = image if image is not None else (study.images[0] if study.images else None)
    return image if isinstance(image, str) else f"<image bytes of {study.row_id}>"
