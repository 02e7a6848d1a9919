"""One dataset API over every layout of radiograph–report pairs, with bad rows quarantined, never fatal.

Layouts: (a) an imagefolder with `metadata.jsonl`/`metadata.csv` (`datasets`' convention: `file_name` +
`text`), (b) a CSV/JSONL table with configurable image and text columns, (c) a `datasets` dataset by Hub
name or `save_to_disk` folder.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .images import ImageReadError, read_radiograph, to_rgb_tensor
from .phantom import builtin_phantom_dir
from .reports import select_section, truncate_to_tokens

logger = logging.getLogger(__name__)

IMAGE_COLUMN_GUESSES = ("image", "file_name", "image_path", "path", "dicom_path", "filename")
TEXT_COLUMN_GUESSES = ("text", "report", "caption", "impression", "findings")
VALIDATION_SPLITS = ("val", "validate", "validation")
PHANTOM_VALIDATION_SIZE = 32


class BadRowError(RuntimeError):
    """Raised under `--strict` at the first row that cannot be used."""


@dataclass
class Pair:
    """One radiograph–report pair: where the image is (a path or raw bytes) and the raw report."""

    row_id: str
    image: str | bytes | None
    report: str | None
    metadata: dict = field(default_factory=dict)


@dataclass
class BadRow:
    row_id: str
    source: str
    reason: str


class Quarantine:
    """Rows that could not be used: counted, kept with their reason, written to the run folder."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.rows: list[BadRow] = []

    def add(self, row_id: str, source: str, reason: str) -> None:
        if self.strict:
            raise BadRowError(f"Bad row {row_id} ({source}): {reason}. Fix or remove it, or run without --strict to skip bad rows.")
        if row_id in {r.row_id for r in self.rows}:
            return
        self.rows.append(BadRow(row_id, source, reason))
        logger.warning("Skipping row %s (%s): %s", row_id, source, reason)

    def write(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(vars(row)) + "\n" for row in self.rows)


def read_table(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"{path}: unsupported table format; use .csv or .jsonl")


def _pick_column(name: str | None, columns, guesses, what: str, source) -> str:
    if name is not None:
        if name not in columns:
            raise ValueError(f"{source}: no {what} column {name!r}; columns are {sorted(columns)}. Set --{what}_column.")
        return name
    for guess in guesses:
        if guess in columns:
            return guess
    raise ValueError(f"{source}: cannot tell which column holds the {what}; columns are {sorted(columns)}. Set --{what}_column.")


def pairs_from_table(table: str | Path, image_column=None, caption_column=None, image_root=None, split: str | None = None) -> list[Pair]:
    """Pairs from a CSV/JSONL table; relative image paths are resolved against `image_root` (default: the table's folder).

    A table with a `split` column is filtered to `split` when one is given.
    """
    table = Path(table)
    rows = read_table(table)
    if not rows:
        raise ValueError(f"{table}: table has no rows")
    columns = set().union(*(row.keys() for row in rows))
    image_column = _pick_column(image_column, columns, IMAGE_COLUMN_GUESSES, "image", table)
    caption_column = _pick_column(caption_column, columns, TEXT_COLUMN_GUESSES, "caption", table)
    root = Path(image_root) if image_root else table.parent
    pairs = []
    for i, row in enumerate(rows):
        if split and "split" in row and not _same_split(row["split"], split):
            continue
        image = row.get(image_column)
        path = str(root / image) if image else None
        pairs.append(Pair(f"{table.name}:{i + 1}", path, row.get(caption_column), row))
    return pairs


def _same_split(name: str, wanted: str) -> bool:
    return name == wanted or (name in VALIDATION_SPLITS and wanted in VALIDATION_SPLITS)


def pairs_from_imagefolder(data_dir: str | Path, image_column=None, caption_column=None, split: str = "train") -> list[Pair]:
    """Pairs from an imagefolder: `metadata.jsonl` or `metadata.csv` in its `split/` folder, or (train) at the root."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--train_data_dir {data_dir} is not a directory")
    names = VALIDATION_SPLITS if split in VALIDATION_SPLITS else (split,)
    folders = [data_dir / name for name in names] + ([data_dir] if split == "train" else [])
    for folder in folders:
        for name in ("metadata.jsonl", "metadata.csv"):
            if (folder / name).is_file():
                return pairs_from_table(folder / name, image_column or "file_name", caption_column)
    raise FileNotFoundError(
        f"{data_dir}: no metadata.jsonl or metadata.csv for split {split!r}. Add one with a `file_name` and a `text` column "
        "(the datasets imagefolder convention), or pass a table with --train_data_file."
    )


def pairs_from_datasets(name_or_dir: str, config_name=None, split="train", image_column=None, caption_column=None) -> list[Pair]:
    """Pairs from a `datasets` dataset (Hub name or `save_to_disk` folder); images are kept undecoded."""
    import datasets

    saved = Path(name_or_dir)
    if (saved / "dataset_info.json").is_file() or (saved / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(name_or_dir)
        dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        dataset = datasets.load_dataset(name_or_dir, config_name, split=split)
    image_column = _pick_column(image_column, dataset.column_names, IMAGE_COLUMN_GUESSES, "image", name_or_dir)
    caption_column = _pick_column(caption_column, dataset.column_names, TEXT_COLUMN_GUESSES, "caption", name_or_dir)
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    pairs = []
    for i, row in enumerate(dataset):
        image = row[image_column]
        if isinstance(image, dict):  # undecoded Image feature: raw bytes, or a path to them
            image = image.get("bytes") or image.get("path")
        pairs.append(Pair(f"{name_or_dir}[{i}]", image, row[caption_column]))
    return pairs


def image_problem(image: str | bytes | None, source: str, decode: bool = True) -> str | None:
    """Why an image cannot be used (missing, or with `decode` unreadable), or None."""
    if image is None:
        return "no image given"
    if isinstance(image, str) and not Path(image).is_file():
        return "image file not found"
    if decode:
        try:
            read_radiograph(image, name=source)
        except ImageReadError as err:
            return str(err)
    return None


def screen_rows(num_rows: int, problem: Callable[[int], str | None], describe: Callable[[int], tuple[str, str]], quarantine: Quarantine) -> list[int]:
    """Indices of usable rows, checked in parallel but quarantined in row order (so --strict names the first)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # image decoding releases the GIL
        problems = pool.map(problem, range(num_rows))
        good = []
        for i, reason in enumerate(tqdm(problems, total=num_rows, desc="Checking rows", unit="row")):
            if reason is None:
                good.append(i)
            else:
                quarantine.add(*describe(i), reason)
    if not good:
        raise ValueError(f"No usable rows: all {num_rows} were bad (first reasons: {[r.reason for r in quarantine.rows[:3]]})")
    return good


class ImageReportDataset(Dataset):
    """Model-ready pairs: pixels in [-1, 1] at `resolution` and tokenized report text.

    Every row is checked before training (missing file, empty report, and with `verify_images` an image
    that does not decode): bad rows go to the quarantine, or under strict mode the first one in row order
    stops the run. An image that breaks later is skipped when met (the batch is built without it).
    """

    def __init__(
        self,
        pairs: list[Pair],
        resolution: int,
        tokenizer,
        report_section: str = "impression",
        quarantine: Quarantine | None = None,
        verify_images: bool = True,
        max_tokens: int | None = None,
    ):
        """`max_tokens`: report tokens kept (cut at a sentence boundary); default the tokenizer's limit less its special tokens."""
        self.resolution = resolution
        self.tokenizer = tokenizer
        max_tokens = max_tokens or tokenizer.model_max_length - tokenizer.num_special_tokens_to_add()
        self.quarantine = quarantine or Quarantine()
        self.num_truncated = 0
        self.rows: list[tuple[Pair, str]] = []
        texts = [select_section(pair.report or "", report_section) for pair in pairs]

        def problem(i: int) -> str | None:
            empty = None if texts[i] else f"empty report (no text in section {report_section!r})"
            return image_problem(pairs[i].image, _source(pairs[i]), verify_images) or empty

        for i in screen_rows(len(pairs), problem, lambda i: (pairs[i].row_id, _source(pairs[i])), self.quarantine):
            text, truncated = truncate_to_tokens(texts[i], self.count_tokens, max_tokens)
            self.num_truncated += truncated
            self.rows.append((pairs[i], text))

    def __len__(self) -> int:
        return len(self.rows)

    def text(self, index: int) -> str:
        return self.rows[index][1]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def tokenize(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids[0]

    def image(self, index: int) -> str | bytes:
        """The row's image as given: a path or raw bytes."""
        return self.rows[index][0].image

    def __getitem__(self, index: int) -> dict:
        return self.item(index)

    def bad_row(self, index: int, reason: str) -> BadRow:
        pair = self.rows[index][0]
        return BadRow(pair.row_id, _source(pair), reason)

    def item(self, index: int, pixels: bool = True, input_ids: bool = True) -> dict:
        """The example, with only the fields asked for (a cache may supply the others)."""
        pair, text = self.rows[index]
        example = {"index": index}
        if pixels:
            try:
                example["pixel_values"] = to_rgb_tensor(read_radiograph(pair.image, name=_source(pair)), self.resolution)
            except ImageReadError as err:  # found while training: skipped here, recorded by the training loop
                return {"index": index, "bad_row": self.bad_row(index, str(err))}
        if input_ids:
            example["input_ids"] = self.tokenize(text)
        return example


def _source(pair: Pair) -> str:
    return pair.image if isinstance(pair.image, str) else f"<image bytes of {pair.row_id}>"


def collate_pairs(examples: list[dict]) -> dict:
    """Stack the good examples; carry the bad ones as `bad_rows` so the main process can record them."""
    good = [e for e in examples if "bad_row" not in e]
    batch = {"bad_rows": [e["bad_row"] for e in examples if "bad_row" in e], "num_examples": len(good),
             "index": torch.tensor([e["index"] for e in good], dtype=torch.long)}
    fields = [key for key in good[0] if key != "index"] if good else []  # pixels/token ids, or their cached encodings
    for key in fields:
        batch[key] = torch.stack([e[key] for e in good])
    return batch


def load_pairs(train_data_dir=None, train_data_file=None, dataset_name=None, dataset_config_name=None, image_column=None,
               caption_column=None, image_root=None, phantom_num_images=256, split="train") -> list[Pair]:
    """Pairs of `split` from whichever source is given; with none, the built-in phantoms (validation: other seeds)."""
    if train_data_dir:
        return pairs_from_imagefolder(train_data_dir, image_column, caption_column, split)
    if train_data_file:
        return pairs_from_table(train_data_file, image_column, caption_column, image_root, None if split == "train" else split)
    if dataset_name:
        return pairs_from_datasets(dataset_name, dataset_config_name, split, image_column, caption_column)
    if split == "train":
        return pairs_from_imagefolder(builtin_phantom_dir(phantom_num_images))
    return pairs_from_imagefolder(builtin_phantom_dir(PHANTOM_VALIDATION_SIZE, seed=1))
