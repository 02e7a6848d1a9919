"""Synthetic radiographs from prompts, each PNG carrying its provenance (prompt, seed, base, adapter, synthetic)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from .lora import LORA_WEIGHTS_NAME
from .models.diffusion import load_pipeline, resolve_base


def base_of_adapter(adapter: str | Path) -> str:
    """The base model an adapter folder was trained on (from its training_config.yaml)."""
    config_file = Path(adapter) / "training_config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: pass --pretrained_model_name_or_path to name the base model")
    with open(config_file, encoding="utf-8") as f:
        return yaml.safe_load(f)["pretrained_model_name_or_path"]


def load_text_to_image_pipeline(adapter: str | None = None, pretrained_model_name_or_path: str | None = None, device: str | None = None):
    """The base pipeline (read from the adapter unless given) with the adapter's LoRA loaded, on `device`."""
    if pretrained_model_name_or_path is None:
        if adapter is None:
            raise ValueError("Give --adapter or --pretrained_model_name_or_path")
        pretrained_model_name_or_path = base_of_adapter(adapter)
    base = resolve_base(pretrained_model_name_or_path)
    pipe = load_pipeline(base)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter), weight_name=LORA_WEIGHTS_NAME)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return pipe, base


def generate_images(
    prompts: list[str],
    output_dir: str | Path,
    adapter: str | None = None,
    pretrained_model_name_or_path: str | None = None,
    num_images: int = 1,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write `num_images` PNGs per prompt plus metadata.jsonl (an imagefolder medfm can train or evaluate on).

    Each prompt is rendered as plain diffusers would: `pipe(prompt, num_images_per_prompt=num_images,
    generator=torch.Generator().manual_seed(seed))`, so the pixels match diffusers with the LoRA loaded.
    """
    pipe, base = load_text_to_image_pipeline(adapter, pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for p, prompt in enumerate(tqdm(prompts, desc="Generating", unit="prompt")):
        images = pipe(prompt, negative_prompt=negative_prompt, num_images_per_prompt=num_images, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed)).images
        for i, image in enumerate(images):
            provenance = {"prompt": prompt, "negative_prompt": negative_prompt or "", "seed": seed, "index_in_batch": i,
                          "num_images_per_prompt": num_images, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                          "base_model": str(base), "adapter": str(adapter or ""), "synthetic": "true", "generator": "medfm"}
            info = PngInfo()
            for key, value in provenance.items():
                info.add_text(key, str(value))
            path = output_dir / f"{p:04d}-{i:02d}.png"
            image.save(path, pnginfo=info)
            paths.append(path)
            rows.append({"file_name": path.name, "text": prompt, **provenance})
    with open(output_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return paths
