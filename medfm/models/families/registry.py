"""The table of text-to-image families, and detection of a base's family from its model_index.json."""

from __future__ import annotations

import json
from pathlib import Path

from .base import DiffusionFamily

DIFFUSION_FAMILIES: dict[str, DiffusionFamily] = {}


def register(family: DiffusionFamily) -> DiffusionFamily:
    DIFFUSION_FAMILIES[family.name] = family
    return family


def supported_pipelines() -> dict[str, str]:
    """model_index.json `_class_name` -> family name, for every registered family."""
    return {cls: family.name for family in DIFFUSION_FAMILIES.values() for cls in family.pipeline_class_names}


def read_model_index(path_or_hub_id: str, revision: str | None = None) -> dict:
    """model_index.json of a local pipeline folder, or of a Hub repo (that one file is downloaded)."""
    folder = Path(path_or_hub_id)
    if folder.is_dir() or folder.is_absolute() or path_or_hub_id.startswith(".") or path_or_hub_id.count("/") > 1:  # a local path, not org/name
        index = folder / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{folder} has no model_index.json: give a diffusers pipeline folder (pipe.save_pretrained writes one) or a Hub id")
        return json.loads(index.read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(path_or_hub_id, "model_index.json", revision=revision)).read_text(encoding="utf-8"))


def family_for_pipeline(class_name: str, source: str = "the base") -> DiffusionFamily:
    supported = supported_pipelines()
    if class_name not in supported:
        listing = ", ".join(f"{cls} ({DIFFUSION_FAMILIES[name].display_name})" for cls, name in sorted(supported.items()))
        raise ValueError(f"{source}: pipeline {class_name!r} is not a supported text-to-image family; supported pipelines: {listing}")
    return DIFFUSION_FAMILIES[supported[class_name]]


def detect_family(path_or_hub_id: str, revision: str | None = None) -> DiffusionFamily:
    """The family of a base (local folder or Hub id), from the pipeline class its model_index.json names."""
    index = read_model_index(path_or_hub_id, revision)
    return family_for_pipeline(index.get("_class_name", "<missing _class_name>"), f"{path_or_hub_id}/model_index.json")
