"""Generation with adapters: radiographs from prompts (each PNG carrying its provenance) and reports from radiographs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm
from transformers import AutoProcessor

from .data.pairs import read_table
from .data.report_batches import encode_prompts
from .hub import resolve_adapter
from .models.diffusion import resolve_base
from .models.families import detect_family
from .models.vlm import load_vlm, resolve_vlm


def adapter_training_config(adapter: str | Path) -> dict:
    """The training_config.yaml an adapter (folder or Hub id) was written with."""
    config_file = resolve_adapter(adapter) / "training_config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: pass --pretrained_model_name_or_path to name the base model")
    with open(config_file, encoding="utf-8") as f:
        return yaml.safe_load(f)


def base_of_adapter(adapter: str | Path) -> str:
    """The base model an adapter (folder or Hub id) was trained on."""
    return adapter_training_config(adapter)["pretrained_model_name_or_path"]


def text_to_image_base(adapter: str | None, pretrained_model_name_or_path: str | None) -> str:
    """The base to load: given, else the one the adapter was trained on (built-ins resolved to their folder)."""
    if pretrained_model_name_or_path is None:
        if adapter is None:
            raise ValueError("Give --adapter or --pretrained_model_name_or_path")
        pretrained_model_name_or_path = base_of_adapter(adapter)
    return resolve_base(pretrained_model_name_or_path)


def adapter_family(adapter: str | Path, pretrained_model_name_or_path: str | None = None):
    """The diffusion family of a text-to-image adapter's base (from its model_index.json)."""
    return detect_family(text_to_image_base(str(adapter), pretrained_model_name_or_path))


def load_text_to_image_pipeline(adapter: str | None = None, pretrained_model_name_or_path: str | None = None, device: str | None = None):
    """The base pipeline (read from the adapter unless given; its family from model_index.json) with the adapter loaded as the
    family's own pipeline loads it, on `device`."""
    base = text_to_image_base(adapter, pretrained_model_name_or_path)
    family = detect_family(base)
    pipe = family.load_pipeline(base)
    if adapter is not None:
        family.load_adapter_into(pipe, resolve_adapter(adapter))
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return pipe, base


def read_prompts(path: str | Path) -> list[dict]:
    """Prompt rows from a .jsonl/.csv file with a `text` or `prompt` column; other columns (e.g. labels) are kept."""
    rows = read_table(Path(path))
    for i, row in enumerate(rows):
        text = row.get("text") or row.get("prompt")
        if not text:
            raise ValueError(f"{path}: row {i + 1} has no `text` or `prompt`")
        row["text"] = text
        row.pop("prompt", None)
    return rows


def generate_images(
    prompts: list[str] | list[dict],
    output_dir: str | Path,
    adapter: str | None = None,
    pretrained_model_name_or_path: str | None = None,
    num_images: int = 1,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    seed: int = 0,
    batch_size: int = 8,
    pipe=None,
    resolution: int | None = None,
) -> list[Path]:
    """Write `num_images` PNGs per prompt plus metadata.jsonl (an imagefolder medfm can train or evaluate on).

    Prompts are strings, or rows with a `text` key whose other keys (labels) go into the metadata.
    Each prompt starts from the noise plain diffusers would draw: `pipe(prompt, num_images_per_prompt=num_images,
    generator=torch.Generator().manual_seed(seed))`, so the images match diffusers with the LoRA loaded (up to the
    float rounding of batching); `batch_size` prompts are denoised together.
    Resumable: prompts whose images already exist are skipped. `pipe`: an already loaded pipeline matching
    `adapter` and the base (e.g. one the demo keeps in memory) instead of loading one. `resolution`: image side in px
    (default: the base's native size, which is also what the plain pipeline renders for SD).
    """
    rows = [{"text": p} if isinstance(p, str) else p for p in prompts]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = [[f"{p:04d}-{i:02d}.png" for i in range(num_images)] for p in range(len(rows))]
    todo = [p for p in range(len(rows)) if not all((output_dir / name).is_file() for name in names[p])]
    if pipe is None and todo:
        pipe = load_text_to_image_pipeline(adapter, pretrained_model_name_or_path)[0]
        pipe.set_progress_bar_config(disable=True)
    base = text_to_image_base(adapter, pretrained_model_name_or_path)
    family = detect_family(base)
    settings = {"negative_prompt": negative_prompt or "", "seed": seed, "num_images_per_prompt": num_images,
                "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "adapter": str(adapter or ""),
                "base_model": base, "synthetic": "true", "generator": "medfm"}
    progress = tqdm(desc="Generating", unit="prompt", initial=len(rows) - len(todo), total=len(rows))
    if todo:
        resolution = resolution or family.native_resolution(pipe)
        trained_length = adapter_training_config(adapter).get("max_sequence_length") if adapter else None  # prompts as training encoded them
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        noise = torch.cat([family.initial_noise(pipe, num_images, seed, resolution)] * len(batch))
        negative = {"negative_prompt": [negative_prompt] * len(batch)} if negative_prompt else {}  # else the pipeline's own default
        images = pipe([rows[p]["text"] for p in batch], **negative,
                      num_images_per_prompt=num_images, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      latents=noise, height=resolution, width=resolution, **family.pipeline_kwargs(trained_length)).images
        for index, image in enumerate(images):
            p, i = batch[index // num_images], index % num_images
            info = PngInfo()
            for key, value in {"prompt": rows[p]["text"], **settings, "index_in_batch": i}.items():
                info.add_text(key, str(value))
            image.save(output_dir / names[p][i], pnginfo=info)
        progress.update(len(batch))
    progress.close()
    with open(output_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
        for p, row in enumerate(rows):
            f.writelines(json.dumps({"file_name": name, **row, "prompt": row["text"], **settings, "index_in_batch": i}) + "\n"
                         for i, name in enumerate(names[p]))
    return [output_dir / name for group in names for name in group]


def load_report_model(adapter: str | None = None, pretrained_model_name_or_path: str | None = None, device: str | None = None):
    """(model with the adapter (folder or Hub id) loaded, processor, family): the processor saved with the adapter wins over the base's."""
    base = pretrained_model_name_or_path or base_of_adapter(adapter)
    model, processor, family = load_vlm(resolve_vlm(base))
    if adapter is not None:
        adapter = resolve_adapter(adapter)
        if (adapter / "processor_config.json").is_file() or (adapter / "preprocessor_config.json").is_file():
            processor = AutoProcessor.from_pretrained(adapter)
        model = PeftModel.from_pretrained(model, str(adapter))
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, processor, family


@torch.no_grad()
def generate_reports(model, processor, family, images: list[list], instructions: list[str], batch_size: int = 8,
                     max_new_tokens: int = 256, show_progress: bool = True, **generate_kwargs) -> list[str]:
    """One report per study (a list of PIL images each); greedy unless `do_sample=True` etc. are passed."""
    reports = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="Writing reports", unit="batch", disable=not show_progress or len(starts) < 2):
        inputs = encode_prompts(processor, family, instructions[start : start + batch_size], images[start : start + batch_size]).to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
        reports += [text.strip() for text in processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]
    return reports
