"""Inputs for reader-study tests: phantoms as the real cases (8/16-bit PNG, JPEG with EXIF, DICOM with patient tags) and
"generated" PNGs carrying medfm's provenance text chunks (as medfm.generate writes them), each with names that must not leak."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from conftest import write_dicom
from medfm.data.phantom import make_phantom

PATIENT_NAME = "Doe^Jane"
REAL_STEM = "real_patient_"
SYNTHETIC_STEM = "synthetic_medfm_"
PROMPTS = ("Large right pleural effusion.", "No acute cardiopulmonary process.", "Cardiomegaly.", "Small left pleural effusion.")


def write_real(folder: Path, num: int, size: int = 80) -> Path:
    """Phantom radiographs in four formats, with metadata.jsonl (file_name, text = the prompt it matches)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num):
        image, _ = make_phantom(seed=100 + i, size=size)
        prompt = PROMPTS[i % len(PROMPTS)]
        kind = i % 4
        if kind == 0:
            name = f"{REAL_STEM}{i:03d}.png"
            Image.fromarray((image * 255).astype(np.uint8)).save(folder / name)
        elif kind == 1:
            name = f"{REAL_STEM}{i:03d}_16bit.png"
            Image.fromarray((image * 65535).astype(np.uint16)).save(folder / name)
        elif kind == 2:
            name = f"{REAL_STEM}{i:03d}.jpg"
            exif = Image.Exif()
            exif[0x010E] = f"{REAL_STEM}description"  # ImageDescription
            Image.fromarray((image * 255).astype(np.uint8)).save(folder / name, exif=exif, quality=95)
        else:
            name = f"{REAL_STEM}{i:03d}.dcm"
            write_dicom(folder / name, (image * 4000).astype(np.uint16))
            import pydicom

            ds = pydicom.dcmread(folder / name)
            ds.PatientName, ds.PatientID = PATIENT_NAME, "123456"
            ds.save_as(folder / name)
        rows.append({"file_name": name, "text": prompt})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def write_synthetic(folder: Path, num: int, per_prompt: int = 1, size: int = 64) -> Path:
    """RGB PNGs with medfm.generate's provenance text chunks (prompt, synthetic: true, generator: medfm), a different size from the real ones."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num):
        prompt = PROMPTS[(i // per_prompt) % len(PROMPTS)]
        image, _ = make_phantom(seed=900 + i, size=size)
        info = PngInfo()
        for key, value in {"prompt": prompt, "synthetic": "true", "generator": "medfm", "adapter": "adapters/phantom-text-to-image"}.items():
            info.add_text(key, value)
        name = f"{SYNTHETIC_STEM}{i:04d}.png"
        Image.fromarray((image * 255).astype(np.uint8)).convert("RGB").save(folder / name, pnginfo=info)
        rows.append({"file_name": name, "text": prompt, "prompt": prompt, "synthetic": "true", "generator": "medfm"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def png_chunks(data: bytes) -> list[str]:
    """The chunk types of a PNG file, in order (a blinded case has IHDR, IDAT..., IEND only)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks, offset = [], 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        chunks.append(kind.decode("latin-1"))
        offset += 12 + length
    return chunks


def leaks(data: bytes, provenance: bool = True) -> list[str]:
    """What in these bytes would tell a case's source or origin: file names, patient tags, the adapter's path, metadata chunks,
    and with `provenance` the words of medfm's provenance chunks (a Gradio page has "generator" in its own config)."""
    words = (REAL_STEM, SYNTHETIC_STEM, PATIENT_NAME, "123456", "phantom") + (("generator", "medfm") if provenance else ())
    found = [word for word in words if word.encode() in data]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        found += [c for c in png_chunks(data) if c not in ("IHDR", "IDAT", "IEND")]
    return found
