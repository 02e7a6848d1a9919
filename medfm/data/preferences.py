"""Preference pairs for DPO in TRL's JSONL format: {"images": [path, ...], "prompt": ..., "chosen": ..., "rejected": ...}.

`prompt`, `chosen` and `rejected` are strings (TRL's standard format) or chat messages (its conversational format:
the user turn's text is the prompt, the assistant turn's text the answer). Image paths are relative to the file's
folder unless absolute (or to `image_root`). `medfm pairs` writes such files; a reader study can export them too.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.data import Dataset

from .images import ImageReadError, read_radiograph
from .pairs import BadRow, Quarantine, image_problem, screen_rows
from .studies import to_pil_rgb

PAIR_KEYS = ("images", "prompt", "chosen", "rejected")


def message_text(value) -> str:
    """The text of a standard-format string, or of the last turn of a conversational one (its text parts joined)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        content = value[-1].get("content", "")
        if isinstance(content, str):
            return content.strip()
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text").strip()
    return ""


def read_preference_pairs(path: str | Path, image_root: str | Path | None = None) -> list[dict]:
    """Rows {"row_id", "images": [absolute path], "prompt", "chosen", "rejected"}; a row missing a key keeps it empty (quarantined later)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Preference pairs file {path} not found (make one with `medfm pairs`)")
    root = Path(image_root) if image_root else path.parent
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err})") from err
        images = row.get("images", row.get("image", []))
        images = [images] if isinstance(images, str) else list(images or [])
        rows.append({"row_id": str(row.get("id", f"{path.name}:{number}")), "images": [str(root / image) for image in images],
                     "prompt": message_text(row.get("prompt", "")), "chosen": message_text(row.get("chosen", "")),
                     "rejected": message_text(row.get("rejected", ""))})
    if not any(row["chosen"] and row["rejected"] for row in rows):
        raise ValueError(f"{path}: no preference pairs; expected TRL's JSONL format with keys {', '.join(PAIR_KEYS)}")
    return rows


def write_preference_pairs(rows: list[dict], path: str | Path) -> Path:
    """Write rows with the keys of PAIR_KEYS (plus any extra ones, e.g. scores) as JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


class PreferencePairDataset(Dataset):
    """Pairs checked up front (images readable, chosen and rejected non-empty and different), served as
    {"row_id", "images": [PIL RGB], "instruction", "chosen", "rejected", "indication": None}; with `as_reference`, as a
    validation study whose reference report is the chosen one."""

    def __init__(self, rows: list[dict], max_images: int = 1, quarantine: Quarantine | None = None, verify_images: bool = True,
                 as_reference: bool = False):
        self.quarantine = quarantine or Quarantine()
        self.max_images, self.as_reference = max_images, as_reference

        def problem(i: int) -> str | None:
            row = rows[i]
            if not row["images"]:
                return "no image given"
            image_reason = next((r for r in (image_problem(im, im, verify_images) for im in row["images"][:max_images]) if r), None)
            if image_reason:
                return image_reason
            if not row["prompt"] or not row["chosen"] or not row["rejected"]:
                return "empty prompt, chosen or rejected"
            return "chosen and rejected are the same text" if row["chosen"] == row["rejected"] else None

        good = screen_rows(len(rows), problem, lambda i: (rows[i]["row_id"], rows[i]["images"][0] if rows[i]["images"] else "<no image>"),
                           self.quarantine)
        self.rows = [rows[i] for i in good]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        try:
            images = [to_pil_rgb(read_radiograph(image, name=image)) for image in row["images"][: self.max_images]]
        except ImageReadError as err:  # broke after the up-front check: skipped, recorded by the training loop
            return {"bad_row": BadRow(row["row_id"], row["images"][0], str(err))}
        if self.as_reference:
            return {"row_id": row["row_id"], "images": images, "instruction": row["prompt"], "report": row["chosen"], "indication": None}
        return {"row_id": row["row_id"], "images": images, "instruction": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
                "indication": None}
