"""Image preference pairs for Diffusion-DPO: one prompt, a preferred (chosen) and another (rejected) radiograph.

Format (JSONL, as `medfm study export` writes for image studies), image paths relative to the file (or --image_root):
    {"prompt": "Large right pleural effusion.", "chosen": "prefs_images/c1.png", "rejected": "prefs_images/c2.png"}
Rows with an empty prompt or a missing/unreadable image go to the quarantine, as in medfm.data.pairs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from .images import ImageReadError, read_radiograph, to_rgb_tensor
from .pairs import BadRow, Quarantine, image_problem, read_table, screen_rows
from .reports import truncate_to_tokens

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


class ImagePreferenceDataset(Dataset):
    """(prompt, chosen pixels, rejected pixels) in [-1, 1] at `resolution`; the prompt cut at a sentence boundary to fit the encoder."""

    def __init__(self, table: str | Path, resolution: int, tokenizer, max_tokens: int, quarantine: Quarantine | None = None,
                 image_root: str | Path | None = None, verify_images: bool = True):
        table = Path(table)
        if table.suffix != ".jsonl":
            raise ValueError(f"{table}: image preference pairs are JSONL ({', '.join(PREFERENCE_FIELDS)} per line; `medfm study export` writes them)")
        rows = read_table(table)
        if not rows:
            raise ValueError(f"{table}: no preference pairs")
        missing = [name for name in PREFERENCE_FIELDS if not any(name in row for row in rows)]
        if missing:
            raise ValueError(f"{table}: no {', '.join(missing)} field in any row; each line needs {', '.join(PREFERENCE_FIELDS)}")
        root = Path(image_root) if image_root else table.parent
        self.resolution, self.tokenizer = resolution, tokenizer
        self.quarantine = quarantine or Quarantine()
        self.num_truncated = 0
        row_ids = [f"{table.name}:{i + 1}" for i in range(len(rows))]
        images = [tuple(str(root / row[side]) if row.get(side) else None for side in ("chosen", "rejected")) for row in rows]
        prompts = [(row.get("prompt") or "").strip() for row in rows]

        def problem(i: int) -> str | None:
            for side, image in zip(("chosen", "rejected"), images[i]):
                reason = image_problem(image, str(image), verify_images)
                if reason:
                    return f"{side} image: {reason}"
            return None if prompts[i] else "empty prompt"

        self.rows: list[tuple[str, str, str, str]] = []  # (row id, prompt, chosen path, rejected path)
        for i in screen_rows(len(rows), problem, lambda i: (row_ids[i], str(images[i][0])), self.quarantine):
            prompt, truncated = truncate_to_tokens(prompts[i], lambda text: len(tokenizer(text, add_special_tokens=False).input_ids), max_tokens)
            self.num_truncated += truncated
            self.rows.append((row_ids[i], prompt, *images[i]))

    def __len__(self) -> int:
        return len(self.rows)

    def text(self, index: int) -> str:
        return self.rows[index][1]

    def __getitem__(self, index: int) -> dict:
        row_id, _, chosen, rejected = self.rows[index]
        try:
            return {"index": index, "pixel_values": self._pixels(chosen), "rejected_pixel_values": self._pixels(rejected)}
        except ImageReadError as err:  # found while training: skipped here, recorded by the training loop
            return {"index": index, "bad_row": BadRow(row_id, chosen, str(err))}

    def _pixels(self, path: str) -> torch.Tensor:
        return to_rgb_tensor(read_radiograph(path, name=path), self.resolution)
