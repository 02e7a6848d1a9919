"""Model cards: README.md with Hub YAML metadata, written into every adapter folder."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .config import TrainConfig

TEXT_TO_IMAGE_TAGS = ["lora", "diffusers", "text-to-image", "stable-diffusion", "medical", "radiology", "chest-x-ray", "medfm"]
REPORT_TAGS = ["lora", "peft", "image-text-to-text", "radiology-report-generation", "medical", "radiology", "chest-x-ray", "medfm"]

CARD_TEMPLATE = """---
{card_data}
---

# {title}

A LoRA adapter for [{base}]({base_link}) that generates chest radiographs from radiology report text,
trained with [medfm](https://github.com/medfm/medfm) on {data}.

**Research use only.** Images are synthetic and must not be used for diagnosis.

## Use it with plain diffusers

```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base}", safety_checker=None)
pipe.load_lora_weights("{adapter}")
image = pipe("{prompt}", generator=torch.Generator().manual_seed(0)).images[0]
image.save("radiograph.png")
```

Or with medfm: `medfm generate --adapter {adapter} --prompt "{prompt}"`.

{validation}## Training

| setting | value |
|---|---|
{hyperparameters}

Trained on {num_pairs} image–report pairs ({num_bad} rows skipped as unusable; see `bad_rows.jsonl`).
The text prompt is the report's `{section}` section, cut at sentence boundaries to the text encoder's limit.
`training_config.yaml` holds the full configuration; `accelerate launch recipes/train_lora.py --config training_config.yaml` repeats the run.

## Intended use, limitations and risks

- For research on synthetic radiograph generation (data augmentation, education, method development).
- Not a medical device; generated images are not real patients and carry no diagnostic meaning.
- A generator can reproduce training images: audit memorization before sharing images or this adapter
  when the training data is protected health information.
- Findings absent or rare in the training data are drawn poorly or not at all; biases of the training
  population (scanners, demographics, disease prevalence) carry over.
"""

CARD_HYPERPARAMETERS = ("rank", "lora_alpha", "train_text_encoder", "target_modules", "resolution", "train_batch_size",
                        "gradient_accumulation_steps", "max_train_steps", "learning_rate", "lr_scheduler", "use_8bit_adam",
                        "mixed_precision", "snr_gamma", "noise_offset", "seed")


REPORT_CARD_TEMPLATE = """---
{card_data}
---

# {title}

A LoRA adapter for [{base}]({base_link}) ({family} family) that writes the {section} section of a chest
radiograph report, trained with [medfm](https://github.com/medfm/medfm) on {data}.

**Research use only.** Generated reports are not medical advice and must not be used for diagnosis.

## Use it with plain transformers + peft

```python
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained("{base}"), "{adapter}").eval()
processor = AutoProcessor.from_pretrained("{adapter}")
{prompt_code}
inputs = processor(text=[prompt], images=[[Image.open("chest_xray.png").convert("RGB")]], return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=256, do_sample=False)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip())
```

Or with medfm (PNG, JPEG or DICOM): `medfm report --adapter {adapter} --image chest_xray.dcm`.

{evaluation}## Training

| setting | value |
|---|---|
{hyperparameters}

Trained on {num_studies} studies ({num_bad} skipped as unusable, see `bad_rows.jsonl`; {num_truncated} reports cut at a
sentence boundary to fit `max_length`; image tokens are never cut). The loss covers report tokens only.
`training_config.yaml` holds the full configuration.

## Intended use, limitations and risks

- For research on radiology report generation; outputs need review by a radiologist.
- A report generator can state findings that are not in the image (hallucination) and miss ones that are.
- Biases of the training population (scanners, demographics, disease prevalence, reporting style) carry over.
"""

REPORT_CARD_HYPERPARAMETERS = ("rank", "lora_alpha", "target_modules", "lora_on_vision_tower", "train_projector", "load_in_4bit",
                               "instruction", "max_length", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                               "learning_rate", "lr_scheduler", "use_8bit_adam", "mixed_precision", "seed")


def _hyperparameter_rows(config: TrainConfig, keys) -> str:
    values = config.to_dict()
    return "\n".join(f"| {key} | {values[key]} |" for key in keys)


def _data_description(config: TrainConfig) -> str:
    given = config.train_data_dir or config.train_data_file or config.dataset_name
    return f"`{given}`" if given else "medfm's built-in digital chest-radiograph phantoms"


def _is_hub_id(name: str) -> bool:
    return not Path(name).exists() and name.count("/") == 1


def write_text_to_image_card(directory: str | Path, config: TrainConfig, base: str, num_pairs: int, num_bad: int,
                             validation_image: str | None = None) -> ModelCard:
    """Write README.md for a text-to-image adapter folder and return the card."""
    card_data = ModelCardData(
        base_model=base if _is_hub_id(base) else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=config.license,
        tags=TEXT_TO_IMAGE_TAGS,
        datasets=[config.dataset_name] if config.dataset_name and _is_hub_id(config.dataset_name) else None,
    )
    validation = ""
    if validation_image:
        prompts = "; ".join(config.validation_prompt)
        validation = f"## Samples\n\n![validation grid]({validation_image})\n\nRows, top to bottom: {prompts}\n\n"
    content = CARD_TEMPLATE.format(
        card_data=card_data.to_yaml(),
        title=f"{Path(config.output_dir).name}: radiograph LoRA",
        base=base,
        base_link=f"https://huggingface.co/{base}" if _is_hub_id(base) else base,
        data=_data_description(config),
        adapter=config.output_dir,
        prompt=config.validation_prompt[0] if config.validation_prompt else "Large right pleural effusion.",
        validation=validation,
        hyperparameters=_hyperparameter_rows(config, CARD_HYPERPARAMETERS),
        num_pairs=num_pairs,
        num_bad=num_bad,
        section=config.report_section,
    )
    card = ModelCard(content)
    card.save(Path(directory) / "README.md")
    return card


def write_report_card(directory: str | Path, config: TrainConfig, base: str, family: str, num_studies: int, num_bad: int,
                      num_truncated: int, metrics: dict | None = None) -> ModelCard:
    """Write README.md for a report-generation (PEFT) adapter folder and return the card."""
    card_data = ModelCardData(base_model=base if _is_hub_id(base) else None, library_name="peft", pipeline_tag="image-text-to-text",
                              license=config.license, tags=REPORT_TAGS,
                              datasets=[config.dataset_name] if config.dataset_name and _is_hub_id(config.dataset_name) else None)
    if family == "paligemma":
        prompt_code = f'prompt = "<image>" + {config.instruction!r}'
    else:
        prompt_code = ('messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ' + repr(config.instruction) + '}]}]\n'
                       'prompt = processor.apply_chat_template(messages, add_generation_prompt=True)')
    evaluation = ""
    if metrics:
        evaluation = ("## Validation (end of training, greedy decoding)\n\n| metric | value |\n|---|---|\n"
                      + "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()) + "\n\n")
    content = REPORT_CARD_TEMPLATE.format(
        card_data=card_data.to_yaml(), title=f"{Path(config.output_dir).name}: radiology report LoRA", base=base,
        base_link=f"https://huggingface.co/{base}" if _is_hub_id(base) else base, family=family, section=config.report_section,
        data=_data_description(config), adapter=config.output_dir, prompt_code=prompt_code, evaluation=evaluation,
        hyperparameters=_hyperparameter_rows(config, REPORT_CARD_HYPERPARAMETERS), num_studies=num_studies, num_bad=num_bad,
        num_truncated=num_truncated,
    )
    card = ModelCard(content)
    card.save(Path(directory) / "README.md")
    return card
