"""Checks on what a demo visitor types or uploads; each refusal is an InputError whose message the page shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.images import DICOM_SUFFIXES, ImageReadError, _is_dicom, read_radiograph

MAX_PROMPT_CHARS = 1000
MAX_IMAGE_PIXELS = 40_000_000  # 40 MP: larger than any chest radiograph detector (43 cm at 0.1 mm is ~18 MP)


class InputError(ValueError):
    """Input the demo refuses; the message says what is wrong and what to do."""


def check_prompt(prompt: str | None) -> str:
    """The prompt, stripped; refused when empty or longer than MAX_PROMPT_CHARS."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise InputError("Type a prompt (a finding or a report impression), or click one of the findings under the box.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"The prompt has {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}. "
                         "The text encoder reads only its first 77 tokens: give the impression, not the whole report.")
    return prompt


def header_pixels(path: str | Path, name: str) -> int | None:
    """Pixels per frame from the file's header alone (DICOM Rows x Columns, else the bitmap size); None when DICOM lacks them.

    Read before decoding so that a huge image is refused without allocating it.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(132 + 4)
    if _is_dicom(head) or path.suffix.lower() in DICOM_SUFFIXES:
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as err:  # pydicom raises many types for damaged files
            raise InputError(f"{name}: not a readable DICOM file ({err})") from err
        return int(ds.Rows) * int(ds.Columns) if "Rows" in ds and "Columns" in ds else None
    try:
        with Image.open(path) as image:  # reads the header only
            width, height = image.size
    except Image.DecompressionBombError as err:
        raise InputError(f"{name}: the image is far too large ({err})") from err
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{name}: not an image medfm can read. Upload a chest radiograph as PNG, JPEG, TIFF or DICOM.") from err
    return width * height


def read_upload(path: str | Path) -> np.ndarray:
    """An uploaded radiograph read as training reads it (DICOM windowing, MONOCHROME1, 16-bit), after the size check."""
    name = Path(path).name
    pixels = header_pixels(path, name)
    if pixels is not None and pixels > MAX_IMAGE_PIXELS:
        raise InputError(f"{name}: {pixels / 1e6:.0f} megapixels; the limit is {MAX_IMAGE_PIXELS / 1e6:.0f}. Downscale the image and upload it again.")
    try:
        return read_radiograph(path, name=name)
    except ImageReadError as err:
        raise InputError(str(err)) from err
