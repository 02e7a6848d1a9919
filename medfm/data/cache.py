"""On-disk cache of what frozen encoders make of the data: VAE latent distributions and text-encoder embeddings.

Each entry is one safetensors file named by a sha256 of (the input's content, the preprocessing settings, the
encoder's identity), so a cache is reused across runs and datasets and recomputed when any of the three changes.
Hand-written because diffusers has no caching API (kohya's sd-scripts and SimpleTuner keep theirs inside their trainers).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..paths import medfm_home

LATENT_PREPROCESSING_VERSION = 1  # bump when images.py changes how pixels are made (resize, crop, scaling)


def default_cache_dir() -> Path:
    return medfm_home() / "cache"


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def encoder_identity(model: torch.nn.Module) -> str:
    """A model's identity: its class, its config (private `_` keys such as the folder it came from left out) and every weight, dtype included."""
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    h = hashlib.sha256(f"{type(model).__name__}\0{json.dumps(config, sort_keys=True, default=str)}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"\0{name}:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
        h.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def content_bytes(source: str | bytes) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


class EncodingCache:
    """One kind of encoder output (`kind`: a folder name) for one encoder and one set of preprocessing settings."""

    def __init__(self, root: str | Path, kind: str, encoder_id: str, settings: dict):
        self.folder = Path(root) / kind
        self.salt = digest(encoder_id, json.dumps(settings, sort_keys=True))

    def key(self, content: bytes) -> str:
        return digest(self.salt, content)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict[str, torch.Tensor]:
        return load_file(self.path(key))

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write atomically: processes sharing the folder never see half a file."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, staging)
        os.replace(staging, path)


def fill_cache(cache: EncodingCache, keys: Sequence[str], encode: Callable[[list[int]], list[dict[str, torch.Tensor] | None]], batch_size: int,
               accelerator, desc: str) -> None:
    """Encode the items whose key is not cached yet, `batch_size` at a time, each process a share.

    `encode(indices)` returns one dict of tensors per index (None for an item it could not read). Entries
    missing after every process finished (a cache folder not shared between machines) are made locally.
    """
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    missing = [i for key, i in first.items() if not cache.has(key)]
    share = missing[accelerator.process_index :: accelerator.num_processes]
    _encode_into(cache, keys, share, encode, batch_size, desc, disable=not accelerator.is_local_main_process)
    accelerator.wait_for_everyone()
    _encode_into(cache, keys, [i for i in missing if not cache.has(keys[i])], encode, batch_size, desc, disable=True)


def _encode_into(cache, keys, indices, encode, batch_size, desc, disable) -> None:
    with tqdm(total=len(indices), desc=desc, unit="item", disable=disable or not indices) as bar:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            for i, tensors in zip(chunk, encode(chunk), strict=True):
                if tensors is not None:
                    cache.save(keys[i], tensors)
            bar.update(len(chunk))


class CachedDataset(Dataset):
    """ImageReportDataset examples (index, pixels) with the latents and/or text embeddings read from caches, by example index.

    `latents` and `text` are (cache, per-example keys) or None (pixels are read instead; prompts are encoded in the step,
    from the example's text found by its index).
    """

    def __init__(self, dataset, latents: tuple[EncodingCache, Sequence[str]] | None, text: tuple[EncodingCache, Sequence[str]] | None):
        self.dataset, self.latents, self.text = dataset, latents, text

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        example = self.dataset.item(index, pixels=self.latents is None, input_ids=False)
        for cache, keys in filter(None, (self.latents, self.text)):
            if not cache.has(keys[index]):  # its image could not be read while caching
                return self._unusable(index)
            example.update(cache.load(keys[index]))
        return example

    def _unusable(self, index: int) -> dict:
        """The bad row with the reader's own reason (or, if the image reads now, a note that it was not cached)."""
        example = self.dataset.item(index, pixels=True, input_ids=False)
        if "bad_row" in example:
            return example
        return {"index": index, "bad_row": self.dataset.bad_row(index, "image was unreadable while the latent cache was built; run again to cache it")}
