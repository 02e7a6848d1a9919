"""Read any radiograph (8/16-bit PNG, JPEG, DICOM) into a normalised grayscale array, then into model input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

DICOM_SUFFIXES = {".dcm", ".dicom"}
RADIOGRAPH_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"} | DICOM_SUFFIXES


class ImageReadError(ValueError):
    """A radiograph that cannot be read; the message says why and what to do."""


def _is_dicom(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


def read_dicom(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """DICOM pixels -> float32 [0, 1] with modality LUT (slope/intercept), VOI LUT/window, MONOCHROME1 inverted."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as err:  # pydicom raises many types for damaged files
        raise ImageReadError(f"{name}: not a readable DICOM file ({err})") from err
    if "PixelData" not in ds:
        raise ImageReadError(f"{name}: DICOM has no pixel data (a structured report or presentation state?)")
    try:
        pixels = ds.pixel_array
    except Exception as err:
        raise ImageReadError(
            f"{name}: cannot decode DICOM pixels with transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')} "
            f"({err}). Compressed DICOM needs a decoder: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
        ) from err
    if pixels.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: first frame
    if pixels.ndim != 2:
        raise ImageReadError(f"{name}: expected one grayscale frame, got pixel array of shape {pixels.shape}")
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds)
    array = _min_max(values)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        array = 1.0 - array  # MONOCHROME1 shows air bright; flip to the usual MONOCHROME2 look
    return array


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def read_bitmap(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """PNG/JPEG/TIFF -> float32 [0, 1] grayscale, scaled by the file's own bit depth (8 or 16 bit)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now: truncated files fail here, not later
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float32)
                return np.clip(array / 65535.0, 0, 1)
            if image.mode == "F":
                return _min_max(np.asarray(image, dtype=np.float32))
            return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageReadError(f"{name}: cannot decode image ({err})") from err


def read_radiograph(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Read a radiograph from a path or raw bytes into a float32 (H, W) array in [0, 1] (bright = dense)."""
    if isinstance(source, (str, Path)):
        name = name or str(source)
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError as err:
            raise ImageReadError(f"{name}: file not found") from err
    else:
        data, name = source, name or "<bytes>"
    if not data:
        raise ImageReadError(f"{name}: file is empty")
    if _is_dicom(data) or Path(name).suffix.lower() in DICOM_SUFFIXES:
        return read_dicom(data, name)
    return read_bitmap(data, name)


def radiograph_files(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Radiograph files (PNG/JPEG/TIFF/DICOM by suffix) in `folder` (and below it when `recursive`), sorted."""
    candidates = Path(folder).rglob("*") if recursive else Path(folder).iterdir()
    files = sorted(p for p in candidates if p.is_file() and p.suffix.lower() in RADIOGRAPH_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no radiographs ({', '.join(sorted(RADIOGRAPH_SUFFIXES))}) found")
    return files


def to_rgb_tensor(array: np.ndarray, resolution: int) -> torch.Tensor:
    """(H, W) [0, 1] -> (3, R, R) in [-1, 1]: resize the short side to R, centre-crop, repeat to 3 channels.

    Centre crop, never random crop or flip: a flip swaps left and right, and the report names the side.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(array))[None]
    tensor = v2.functional.resize(tensor, resolution, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    tensor = v2.functional.center_crop(tensor, [resolution, resolution])
    return (tensor.clamp(0, 1) * 2 - 1).expand(3, -1, -1).contiguous()
