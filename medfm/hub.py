"""The Hub side of an adapter: its model card (README.md with Hub YAML metadata), push, and pull by Hub id."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

from .config import METHOD_KEYS, TrainConfig
from .interop import adapter_kind

if TYPE_CHECKING:
    from .models.vlm import VLMFamily

EVAL_RESULTS_NAME = "eval_results.json"
PUSH_IGNORE_PATTERNS = ["checkpoint-*"]  # resumable state stays local; the Hub gets the final adapter
EVALUATION_START, EVALUATION_END = "<!-- medfm:evaluation -->", "<!-- /medfm:evaluation -->"
MEMORIZATION_START, MEMORIZATION_END = "<!-- medfm:memorization -->", "<!-- /medfm:memorization -->"

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

Base family: {family}; trained with {objective}.

```python
import torch
{loading_code}
image = pipe("{prompt}"{call_arguments}, generator=torch.Generator().manual_seed(0)).images[0]
image.save("radiograph.png")
```

Or with medfm: `medfm generate --adapter {adapter} --prompt "{prompt}"`.

{validation}{evaluation}

## Training data

{data_section}

## Training

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
  when the training data is protected health information. {memorization}
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
{base_import}
model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained({base_expression}), "{adapter}").eval()
processor = AutoProcessor.from_pretrained("{adapter}")
image = Image.open("chest_xray.png").convert("RGB")
{inputs_code}
output = model.generate(**inputs, max_new_tokens=256, do_sample=False)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip())
```

Or with medfm (PNG, JPEG or DICOM): `medfm report --adapter {adapter} --image chest_xray.dcm`.

{validation}{evaluation}

## Training data

{data_section}

## Training

{method}

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
ADVANTAGE_SCALING = {"group": "divided by the group's std", "batch": "divided by the batch's reward std", "none": "not scaled"}  # --scale_rewards


def _method_section(config: TrainConfig) -> str:
    """How the adapter was trained: the method, its reward and the adapter it started from."""
    reference = config.method != "sft"
    if config.init_adapter:
        start = f"Started from the adapter `{config.init_adapter}`: its LoRA was trained further" + ("; it is also the reference policy." if reference else ".")
    else:
        start = "Started from the base model" + (" (the reference policy: the base with the adapter disabled)." if reference else ".")
    if config.method == "grpo":
        reward = " + ".join(f"{weight:g} x `{name}`" for name, weight in config.reward.items())
        text = (f"Method: **GRPO** (group relative policy optimization): {config.num_generations} reports sampled per study (temperature "
                f"{config.temperature}, top-p {config.top_p}, at most {config.max_new_tokens} tokens), scored with the reward {reward} "
                f"(`medfm.rewards`), advantages centred on each study's group mean and {ADVANTAGE_SCALING[config.scale_rewards]}, "
                f"clipped ratio (epsilon {config.epsilon}), KL to the starting policy weighted {config.beta}.")
    elif config.method == "dpo":
        text = (f"Method: **DPO** (direct preference optimization, sigmoid loss, beta {config.beta}) on preference pairs from "
                f"`{config.train_data_file}` (TRL's format).")
    else:
        text = "Method: **SFT** (supervised fine-tuning): next-token loss on the reference reports."
    return f"{text} {start}"


def _hyperparameter_rows(config: TrainConfig, keys) -> str:
    values = config.to_dict()
    return "\n".join(f"| {key} | {values[key]} |" for key in keys)


def _data_description(config: TrainConfig) -> str:
    given = config.train_data_dir or config.train_data_file or config.dataset_name
    return f"`{given}`" if given else "medfm's built-in digital chest-radiograph phantoms"


def _data_section(config: TrainConfig) -> str:
    """What the user said about the data (`dataset_description`), where it came from, and what part of the report was used."""
    description = config.dataset_description or "No description was given (set `dataset_description` in the training config)."
    source = _data_description(config) + (f", config `{config.dataset_config_name}`" if config.dataset_config_name else "")
    limit = f"\n- Limited to the first {config.max_train_samples} rows (`max_train_samples`)." if config.max_train_samples else ""
    return f"{description}\n\n- Source: {source}.\n- Report section used: `{config.report_section}`.{limit}"


def _is_hub_id(name: str) -> bool:
    return not Path(name).exists() and name.count("/") == 1


def _adapter_reference(config: TrainConfig) -> str:
    """How the card's snippets name the adapter: the Hub repo when the run pushes, else the output folder."""
    return config.hub_model_id if config.push_to_hub and config.hub_model_id else config.output_dir


def _base_link(base: str) -> str:
    if base.startswith("builtin:"):
        return "https://github.com/medfm/medfm#built-in-bases"
    return f"https://huggingface.co/{base}" if _is_hub_id(base) else base


def _base_in_code(base: str, resolver: str) -> dict[str, str]:
    """The card code's base: a Hub id or folder as is; medfm's built-in bases through `resolver`, which writes them to a folder."""
    if base.startswith("builtin:"):
        module, _, function = resolver.rpartition(".")
        return {"base_import": f"from {module} import {function}  # {base} is medfm's built-in base: this writes it to a folder\n",
                "base_expression": f'{function}("{base}")'}
    return {"base_import": "", "base_expression": f'"{base}"'}


def _card_data(config: TrainConfig, base: str, library: str, pipeline_tag: str, tags: list[str], results: dict) -> ModelCardData:
    name = _adapter_reference(config)
    return ModelCardData(
        base_model=base if _is_hub_id(base) else None, library_name=library, pipeline_tag=pipeline_tag, license=config.license, tags=tags,
        datasets=[config.dataset_name] if config.dataset_name and _is_hub_id(config.dataset_name) else None,
        model_name=name if results else None, eval_results=_model_index(results, pipeline_tag) or None,
    )


def write_text_to_image_card(directory: str | Path, config: TrainConfig, num_pairs: int, num_bad: int,
                             validation_image: str | None = None, objective: str | None = None) -> ModelCard:
    """Write README.md for a text-to-image adapter folder (its base: the one `config` records; its family read from the base's
    model_index.json) and return the card. `objective`: what training optimised (default: the family's objective)."""
    from .models.diffusion import resolve_base
    from .models.families import detect_family

    base = config.pretrained_model_name_or_path
    family = detect_family(resolve_base(base), config.revision)
    in_code = _base_in_code(base, "medfm.models.diffusion.resolve_base")
    results = read_eval_results(directory)
    validation = ""
    if validation_image:
        prompts = "; ".join(config.validation_prompt)
        validation = f"## Samples\n\n![validation grid]({validation_image})\n\nRows, top to bottom: {prompts}\n\n"
    content = CARD_TEMPLATE.format(
        card_data=_card_data(config, base, "diffusers", "text-to-image", TEXT_TO_IMAGE_TAGS, results).to_yaml(),
        title=f"{Path(config.output_dir).name}: radiograph LoRA",
        base=base,
        base_link=_base_link(base),
        family=family.display_name,
        objective=objective or family.objective_summary,
        call_arguments=family.card_call_arguments(config.resolution, config.max_sequence_length),
        loading_code=in_code["base_import"] + family.loading_snippet(in_code["base_expression"], f'"{_adapter_reference(config)}"'),
        data=_data_description(config),
        adapter=_adapter_reference(config),
        prompt=config.validation_prompt[0] if config.validation_prompt else "Large right pleural effusion.",
        validation=validation,
        evaluation=_evaluation_section(results),
        data_section=_data_section(config),
        hyperparameters=_hyperparameter_rows(config, CARD_HYPERPARAMETERS),
        num_pairs=num_pairs,
        num_bad=num_bad,
        section=config.report_section,
        memorization=_memorization_text(results),
    )
    card = ModelCard(content)
    card.save(Path(directory) / "README.md")
    return card


def write_report_card(directory: str | Path, config: TrainConfig, family: VLMFamily, num_studies: int, num_bad: int,
                      num_truncated: int, metrics: dict | None = None) -> ModelCard:
    """Write README.md for a report-generation (PEFT) adapter folder (its base: the one `config` records) and return the card."""
    base = config.pretrained_model_name_or_path
    results = read_eval_results(directory)
    if not family.has_chat_template:  # PaliGemma: a prefix of image tokens, then the instruction
        inputs_code = (f'prompt = "<image>" + {config.instruction!r}\n'
                       'inputs = processor(text=[prompt], images=[[image]], return_tensors="pt")')
    else:  # tokenized by the template: a template that writes the BOS itself (Gemma 3) gets no second one
        inputs_code = ('messages = [{"role": "user", "content": [{"type": "image", "image": image}, '
                       '{"type": "text", "text": ' + repr(config.instruction) + '}]}]\n'
                       'inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")')
    validation = ""
    if metrics:
        validation = ("## Validation (end of training, greedy decoding)\n\n| metric | value |\n|---|---|\n"
                      + "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()) + "\n\n")
    content = REPORT_CARD_TEMPLATE.format(
        card_data=_card_data(config, base, "peft", "image-text-to-text", REPORT_TAGS + ([config.method] if config.method != "sft" else []),
                             results).to_yaml(),
        title=f"{Path(config.output_dir).name}: radiology report LoRA", base=base,
        base_link=_base_link(base), **_base_in_code(base, "medfm.models.vlm.resolve_vlm"), family=family.name, section=config.report_section,
        data=_data_description(config), adapter=_adapter_reference(config), inputs_code=inputs_code, validation=validation,
        evaluation=_evaluation_section(results), data_section=_data_section(config),
        method=_method_section(config), num_studies=num_studies, num_bad=num_bad,
        hyperparameters=_hyperparameter_rows(config, REPORT_CARD_HYPERPARAMETERS + tuple(k for k, methods in METHOD_KEYS.items()
                                                                                           if config.method in methods)),
        num_truncated=num_truncated,
    )
    card = ModelCard(content)
    card.save(Path(directory) / "README.md")
    return card


# ---------------------------------------------------------------------------------------------------- evaluation results
EVALUATION_TITLES = {"images": "Images (`medfm eval images`)", "reports": "Reports (`medfm eval reports`)",
                     "utility": "Downstream utility (`medfm eval utility`)"}


def read_eval_results(directory: str | Path) -> dict:
    """The `medfm eval ... --adapter` results recorded in an adapter folder, by kind (images, reports, utility)."""
    path = Path(directory) / EVAL_RESULTS_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _summary(kind: str, metrics: dict) -> list[dict]:
    """The headline rows (metric, value, 95% CI or None) of one `medfm eval` result."""
    if kind == "reports":
        return [{"metric": name, "value": entry["value"], "ci95": entry["ci95"]} for name, entry in metrics["metrics"].items()]
    if kind == "images":
        rows = [(f"{name} ({key})", entry[name]) for key, entry in metrics["features"].items()
                for name in ("fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage")]
        if "ms_ssim_diversity" in metrics:
            rows.append(("ms_ssim_diversity", metrics["ms_ssim_diversity"]["mean"]))
        if "alignment" in metrics:
            rows.append((f"clip_score ({metrics['alignment']['model']})", metrics["alignment"]["clip_score"]))
        if "memorization" in metrics:
            audit = metrics["memorization"]
            rows += [(f"near_copy_rate ({audit['extractor']})", audit["near_copy_rate"]), ("mean_nearest_ssim", audit["mean_nearest_ssim"]),
                     ("mean_nearest_pixel_distance", audit["pixel"]["mean_nearest_distance"])]
            if "reid" in audit:
                rows.append(("reid_share_above_threshold", audit["reid"]["share_above_threshold"]))
        return [{"metric": name, "value": value, "ci95": None} for name, value in rows]
    if kind == "utility":
        from .eval.utility import mean_auc

        asked = [v["detected_when_asked"] for v in metrics["conditioning_accuracy"].values() if v["detected_when_asked"] is not None]
        rows = [("mean_auc_real", mean_auc(metrics["auc_real"])), ("mean_auc_real_plus_synthetic", mean_auc(metrics["auc_real_plus_synthetic"])),
                ("conditioning_accuracy", sum(asked) / len(asked) if asked else None)]
        return [{"metric": name, "value": value, "ci95": None} for name, value in rows if value is not None]
    raise ValueError(f"Unknown evaluation kind {kind!r}; expected one of {sorted(EVALUATION_TITLES)}")


def record_evaluation(adapter_dir: str | Path, kind: str, metrics: dict, data: str) -> Path:
    """Merge one `medfm eval` result into the adapter's eval_results.json and refresh its model card; returns the json path.

    `data` names what was evaluated (e.g. the references file or the real-image folder).
    """
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--adapter {adapter_dir}: results are recorded into a local adapter folder (for a Hub adapter, "
                                "download it with `hf download`, evaluate with --adapter FOLDER, then `medfm push`)")
    adapter_kind(folder)
    results = read_eval_results(folder)
    results[kind] = {"data": data, "summary": _summary(kind, metrics)}
    if kind == "images" and "memorization" in metrics:
        audit = metrics["memorization"]
        results[kind]["memorization"] = {"near_copy_rate": audit["near_copy_rate"], "threshold": audit["threshold"],
                                         "mean_nearest_ssim": audit["mean_nearest_ssim"], "num_generated": len(audit["nearest_index"]),
                                         "extractor": audit["extractor"]}
        if "reid" in audit:
            results[kind]["memorization"]["reid"] = {name: audit["reid"][name] for name in ("share_above_threshold", "threshold", "mean_score")}
    path = folder / EVAL_RESULTS_NAME
    path.write_text(json.dumps(results, indent=2), encoding="utf-8")
    refresh_card_evaluation(folder)
    return path


def _format(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _evaluation_section(results: dict) -> str:
    parts = ["## Evaluation\n"]
    if not results:
        parts.append("No `medfm eval` results recorded yet: `medfm eval images|reports|utility ... --adapter DIR` adds them here.\n")
    for kind, entry in results.items():
        rows = "\n".join(f"| {row['metric']} | {_format(row['value'])} | "
                         + (f"[{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}]" if row["ci95"] else "-") + " |" for row in entry["summary"])
        parts.append(f"### {EVALUATION_TITLES[kind]}\n\nOn `{entry['data']}`.\n\n| metric | value | 95% CI |\n|---|---|---|\n{rows}\n")
    return f"{EVALUATION_START}\n" + "\n".join(parts) + f"{EVALUATION_END}"


def _memorization_text(results: dict) -> str:
    audit = results.get("images", {}).get("memorization")
    if audit:
        features = f"{audit['extractor']} feature cosine" if "extractor" in audit else "feature cosine"
        text = (f"Memorization audit (`medfm eval images --training_dir`): {audit['near_copy_rate']:.1%} of {audit['num_generated']} generated "
                f"images are near-copies of a training image ({features} > {audit['threshold']}); mean nearest-neighbour SSIM "
                f"{audit['mean_nearest_ssim']:.3f}.")
        if "reid" in audit:
            reid = audit["reid"]
            text += (f" A re-identification network (`--reid_model`) scores {reid['share_above_threshold']:.1%} of them as the same patient as "
                     f"their nearest training image (score > {reid['threshold']}; mean score {reid['mean_score']:.3f}).")
    else:
        text = "Memorization audit: not run yet for this adapter (`medfm eval images ... --training_dir TRAIN --adapter DIR` records it here)."
    return f"{MEMORIZATION_START}{text}{MEMORIZATION_END}"


def _model_index(results: dict, task_type: str) -> list[EvalResult]:
    """Hub `model-index` entries for the recorded metrics (shown on the model page)."""
    return [EvalResult(task_type=task_type, dataset_type=kind, dataset_name=str(entry["data"]), metric_type=row["metric"],
                       metric_value=row["value"])
            for kind, entry in results.items() for row in entry["summary"]]


def _replace_marked(text: str, start: str, end: str, replacement: str) -> str:
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    return pattern.sub(lambda _: replacement, text)


def refresh_card_evaluation(folder: str | Path) -> ModelCard:
    """Re-render the evaluation and memorization parts of README.md (and its model-index) from eval_results.json."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the adapter folder has no model card to update")
    results = read_eval_results(folder)
    text = _replace_marked(path.read_text(encoding="utf-8"), EVALUATION_START, EVALUATION_END, _evaluation_section(results))
    card = ModelCard(_replace_marked(text, MEMORIZATION_START, MEMORIZATION_END, _memorization_text(results)))
    card.data.eval_results = _model_index(results, card.data.pipeline_tag or "text-to-image") or None
    card.data.model_name = (card.data.model_name or Path(folder).resolve().name) if results else None  # model-index needs a name
    card.save(path)
    return card


# ---------------------------------------------------------------------------------------------------- push and pull
def resolve_adapter(name_or_path: str | Path, revision: str | None = None) -> Path:
    """An adapter folder: an existing folder as is, else a Hub model repo id downloaded (and cached) with snapshot_download."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; an adapter is a folder (or a Hub id user/name)")
    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError as err:
        raise FileNotFoundError(f"Adapter folder {path} not found (and {str(name_or_path)!r} is not a Hub id user/name)") from err
    try:
        return Path(snapshot_download(str(name_or_path), revision=revision))
    except (HfHubHTTPError, LocalEntryNotFoundError) as err:
        reason = str(err).splitlines()[0]
        raise FileNotFoundError(f"Adapter {name_or_path}: no such local folder, and it could not be downloaded from the Hub ({reason})") from err


def create_hub_repo(repo_id: str, private: bool = False) -> str:
    """Create the model repo if needed and return its full id (namespace/name). The token comes from HF_TOKEN or `hf auth login`."""
    if get_token() is None:
        raise PermissionError("No Hugging Face token: set HF_TOKEN or run `hf auth login` (medfm never takes a token as a flag or config key)")
    return HfApi().create_repo(repo_id, private=private, exist_ok=True).repo_id


def _point_card_at(folder: Path, repo_id: str) -> None:
    """Make the card's snippets load the adapter from `repo_id` instead of the local output folder it was trained into."""
    card, config = folder / "README.md", folder / "training_config.yaml"
    if not (card.is_file() and config.is_file()):
        return
    import yaml

    local = yaml.safe_load(config.read_text(encoding="utf-8")).get("output_dir")
    if local and local != repo_id:
        text = card.read_text(encoding="utf-8")
        card.write_text(text.replace(f'"{local}"', f'"{repo_id}"').replace(f"--adapter {local} ", f"--adapter {repo_id} "), encoding="utf-8")


def push_adapter(folder: str | Path, repo_id: str, private: bool = False, commit_message: str = "Upload medfm LoRA adapter") -> str:
    """Upload an adapter folder (not its checkpoints) to a Hub model repo, created if needed; returns the repo URL."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Adapter folder {folder} not found")
    adapter_kind(folder)
    repo_id = create_hub_repo(repo_id, private)
    _point_card_at(folder, repo_id)
    api = HfApi()
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, ignore_patterns=PUSH_IGNORE_PATTERNS)
    return f"{api.endpoint}/{repo_id}"
