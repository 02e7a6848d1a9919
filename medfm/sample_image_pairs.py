"""Image preference pairs from a text-to-image adapter's own samples (`medfm pairs --task text-to-image`): N images per
prompt, each scored by a user's scorer (e.g. a classifier for the finding the prompt asks for); the best vs the worst kept
where their scores differ by at least a margin. Written in the format medfm.data.image_preferences reads (Diffusion-DPO).

A scorer is any callable `scorer(images: list[PIL.Image.Image], prompts: list[str]) -> list[float]` (higher is better),
named on the command line by its dotted path, `package.module:function`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from .generate import generate_images, load_text_to_image_pipeline
from .user_code import import_function

ImageScorer = Callable[[list[Image.Image], list[str]], Sequence[float]]


def load_scorer(dotted_path: str) -> ImageScorer:
    """The callable at `package.module:function` (or `package.module.function`)."""
    return import_function(dotted_path, "--scorer", "(images, prompts) -> scores")


def make_image_preference_pairs(adapter: str | None, prompts: list[str], output: str | Path, scorer: ImageScorer, num_samples: int = 4,
                                margin: float = 0.1, num_inference_steps: int = 25, guidance_scale: float = 7.5, seed: int = 0,
                                resolution: int | None = None, pretrained_model_name_or_path: str | None = None, pipe=None) -> dict:
    """Write the pairs to `output` (JSONL; images in a folder beside it, named like it) and return counts.

    Prompt p's images come from `medfm generate` with seed `seed + p` (so each prompt draws other noise; the files carry the
    settings that reproduce them with plain diffusers). Resumable: images already on disk are reused."""
    if num_samples < 2:
        raise ValueError("--num_samples must be at least 2 (a pair needs two images)")
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError("no prompts to sample images for")
    output = Path(output)
    folder = output.with_suffix("")
    if pipe is None:
        pipe = load_text_to_image_pipeline(adapter, pretrained_model_name_or_path)[0]
        pipe.set_progress_bar_config(disable=True)
    rows, below_margin, scores_seen = [], 0, []
    for p, prompt in enumerate(prompts):
        paths = generate_images([prompt], folder / f"{p:05d}", adapter=adapter, pretrained_model_name_or_path=pretrained_model_name_or_path,
                                num_images=num_samples, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed + p,
                                batch_size=1, pipe=pipe, resolution=resolution)
        images = [Image.open(path).convert("RGB") for path in paths]
        scores = [float(s) for s in scorer(images, [prompt] * num_samples)]
        if len(scores) != num_samples:
            raise ValueError(f"the scorer returned {len(scores)} scores for {num_samples} images")
        scores_seen += scores
        best, worst = max(range(num_samples), key=scores.__getitem__), min(range(num_samples), key=scores.__getitem__)
        if scores[best] - scores[worst] < margin:
            below_margin += 1
            continue
        rows.append({"prompt": prompt, "chosen": os.path.relpath(paths[best], output.parent), "rejected": os.path.relpath(paths[worst], output.parent),
                     "chosen_score": scores[best], "rejected_score": scores[worst]})
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return {"pairs": len(rows), "below_margin": below_margin, "prompts": len(prompts), "images": len(scores_seen),
            "mean_score": sum(scores_seen) / len(scores_seen)}
