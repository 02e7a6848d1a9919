"""The demo's model calls: one pipeline / report model per adapter kept in memory, outputs with provenance."""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

from PIL import Image

from ..data.report_batches import full_instruction
from ..eval.labeler import label_report
from ..generate import adapter_training_config, generate_images, generate_reports, load_report_model, load_text_to_image_pipeline
from ..models.families import detect_family

LABEL_NAMES = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}


@lru_cache(maxsize=2)
def text_to_image_pipeline(adapter: str):
    """(pipeline with the adapter's LoRA loaded, base it was loaded from), loaded once per adapter."""
    return load_text_to_image_pipeline(adapter)


@lru_cache(maxsize=2)
def report_model(adapter: str):
    """(model with the adapter, processor, family, instruction the adapter was trained with), loaded once per adapter."""
    return *load_report_model(adapter), adapter_training_config(adapter)["instruction"]


def generate_radiographs(adapter: str, prompt: str, output_dir: str | Path, negative_prompt: str | None = None, num_inference_steps: int = 25,
                         guidance_scale: float = 7.5, seed: int = 0, num_images: int = 1, compare: bool = False) -> tuple[list[Path], list[Path]]:
    """PNGs (with provenance text chunks) from base + adapter, and with `compare` the same prompt and seed from the base alone.

    The base alone is the same pipeline with its LoRA layers switched off (the family's adapter_disabled), so no second copy is loaded.
    """
    pipe, base = text_to_image_pipeline(adapter)
    settings = {"negative_prompt": negative_prompt or None, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                "seed": seed, "num_images": num_images, "pipe": pipe}
    output_dir = Path(output_dir)
    adapted = generate_images([prompt], output_dir / "with-adapter", adapter=adapter, **settings)
    if not compare:
        return adapted, []
    with detect_family(base).adapter_disabled(pipe):
        return adapted, generate_images([prompt], output_dir / "base-only", pretrained_model_name_or_path=base, **settings)


def write_report(adapter: str, image: Image.Image, indication: str | None = None, max_new_tokens: int = 128, base_only: bool = False) -> str:
    """The report the adapter writes for one radiograph (greedy decoding, as `medfm report`); with `base_only`, the report
    of the base alone (peft's disable_adapter: LoRA and fully trained modules switched off, no second copy loaded)."""
    model, processor, family, instruction = report_model(adapter)
    with model.disable_adapter() if base_only else nullcontext():
        return generate_reports(model, processor, family, [[image]], [full_instruction(instruction, indication or None)],
                                max_new_tokens=max_new_tokens, show_progress=False)[0]


def mentioned_labels(report: str) -> list[list[str]]:
    """[observation, positive|negative|uncertain] for each CheXpert observation medfm's labeler finds in the report."""
    return [[name, LABEL_NAMES[value]] for name, value in label_report(report).items() if value is not None]
