"""Training configuration: one dataclass, filled from defaults < YAML file (`--config`) < command-line flags.

Keys and flags carry the names of diffusers' `train_text_to_image_lora.py` wherever the concept is the
same. The defaults are the embedded offline run (built-in tiny base, built-in phantom data); every
recipe in recipes/configs/ overrides them for real models and data.
"""

from __future__ import annotations

import argparse
import difflib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import yaml

BUILTIN_TINY_SD = "builtin:tiny-sd"
BUILTIN_TINY_VLM = "builtin:tiny-llava"
DEFAULT_INSTRUCTION = "Write the findings section of the radiology report for this chest X-ray."
TASK_DEFAULTS = {  # keys whose default depends on the task
    "text-to-image": {"pretrained_model_name_or_path": BUILTIN_TINY_SD, "report_section": "impression",
                      "target_modules": ["to_k", "to_q", "to_v", "to_out.0"]},
    "report": {"pretrained_model_name_or_path": BUILTIN_TINY_VLM, "report_section": "findings"},
}
# The embedded offline run: what a run on a built-in tiny base and the built-in phantoms (no data given) uses where
# neither --config nor a flag says otherwise.
# Tuned so that it teaches the base the finding its pretraining left out, in minutes on 2 CPU cores
# (benchmarks/RESULTS-left-out-finding.md); recipes/configs/demo-*.yaml write the same values out.
BUILTIN_BASE_RECIPES = {
    BUILTIN_TINY_SD: {"phantom_num_images": 1000, "rank": 8, "train_text_encoder": True, "max_train_steps": 800, "learning_rate": 1e-3,
                      "snr_gamma": 5.0},
    BUILTIN_TINY_VLM: {"phantom_num_images": 8000, "report_section": "impression",
                       "instruction": "Write the impression of the radiology report for this chest X-ray.", "max_length": 256,
                       "rank": 16, "lora_alpha": 32, "train_projector": True, "modules_to_save": ["lm_head", "vision_tower"],
                       "max_train_steps": 12000, "learning_rate": 1e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 100,
                       "validation_steps": 1000, "num_validation_samples": 16,
                       "validation_max_new_tokens": 64},
}


# Keys only some report methods read, and their defaults there (None elsewhere, so a resolved config shows what mattered).
METHOD_KEYS = {"reward": ("grpo",), "num_generations": ("grpo",), "temperature": ("grpo",), "top_p": ("grpo",), "max_new_tokens": ("grpo",),
               "epsilon": ("grpo",), "scale_rewards": ("grpo",), "beta": ("grpo", "dpo")}
DEFAULT_REWARD = {"clinical_micro": 1.0, "length": 0.2, "rougel": 0.3}  # medfm.rewards terms (that module imports torch)
SCALE_REWARDS = ("group", "batch", "none")  # what GRPO divides advantages by (medfm.train.grpo.group_advantages)
METHOD_DEFAULTS = {
    "grpo": {"reward": dict(DEFAULT_REWARD), "num_generations": 8, "temperature": 1.0, "top_p": 1.0,
             "max_new_tokens": 128, "epsilon": 0.2, "scale_rewards": "group", "beta": 0.04},
    "dpo": {"beta": 0.1},
}
TEXT_TO_IMAGE_METHOD_DEFAULTS = {"dpo": {"beta_dpo": 2500.0}}


def _opt(default, help: str, choices=None):
    """A config field with its help text (shown by --help) and, optionally, the accepted values."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    task: str = _opt("text-to-image", "What to train: report -> radiograph (text-to-image) or radiograph -> report (report).", ["text-to-image", "report"])
    # Base model
    pretrained_model_name_or_path: str | None = _opt(
        None, f"Hub id or local folder (default: the tiny offline base, {BUILTIN_TINY_SD!r} or {BUILTIN_TINY_VLM!r}).")
    revision: str | None = _opt(None, "Hub revision of the base model.")
    variant: str | None = _opt(None, "Weight variant of the base model, e.g. fp16.")
    # Data (none given: built-in phantoms)
    train_data_dir: str | None = _opt(None, "Imagefolder with metadata.jsonl/metadata.csv (file_name + text).")
    train_data_file: str | None = _opt(None, "CSV/JSONL table of image paths and reports, or R2Gen's annotation.json.")
    reports_dir: str | None = _opt(None, "MIMIC-CXR layout: folder holding files/pXX/pSUBJECT/sSTUDY.txt (default: --train_data_dir).")
    image_root: str | None = _opt(None, "Folder that relative image paths in --train_data_file start from (default: the table's folder).")
    dataset_name: str | None = _opt(None, "A `datasets` dataset: Hub name or save_to_disk folder.")
    dataset_config_name: str | None = _opt(None, "Config name of --dataset_name.")
    image_column: str | None = _opt(None, "Column with the image (default: guessed from image, file_name, image_path, path).")
    caption_column: str | None = _opt(None, "Column with the report (default: guessed from text, report, caption).")
    report_section: str | None = _opt(None, "Report section used: the prompt (text-to-image; default impression) or the target (report; default findings).",
                                      ["findings", "impression", "both", "full"])
    indication_column: str | None = _opt(None, "Column with the indication/clinical history added to the report prompt (default: guessed).")
    phantom_num_images: int = _opt(256, "Number of built-in phantoms when no data is given.")
    max_train_samples: int | None = _opt(None, "Use only the first N pairs (for quick trials).")
    strict: bool = _opt(False, "Stop at the first bad row instead of skipping it.")
    verify_images: bool = _opt(True, "Decode every image once before training so bad rows are found up front (off: skipped when met).")
    resolution: int | None = _opt(None, "Training resolution in px (default: the base model's native size).")
    dataloader_num_workers: int = _opt(0, "DataLoader worker processes.")
    # LoRA
    rank: int = _opt(4, "LoRA rank.")
    lora_alpha: int | None = _opt(None, "LoRA alpha (default: = rank).")
    lora_dropout: float = _opt(0.0, "LoRA dropout.")
    target_modules: list[str] | None = _opt(None, "Modules that get LoRA (default: UNet attention; for report, the language model's linear layers).")
    train_text_encoder: bool = _opt(False, "Also LoRA-adapt the text encoder (helps with radiology vocabulary).")
    text_encoder_target_modules: list[str] = _opt(["q_proj", "k_proj", "v_proj", "out_proj"], "Text-encoder modules that get LoRA.")
    modules_to_save: list[str] | None = _opt(None, "report: modules trained fully and saved with the adapter (peft's modules_to_save), e.g. lm_head.")
    lora_on_vision_tower: bool = _opt(False, "report: also LoRA-adapt the vision tower.")
    train_projector: bool = _opt(False, "report: train the vision-language projector fully (peft modules_to_save).")
    load_in_4bit: bool = _opt(False, "report: QLoRA, the frozen base in 4-bit NF4 (CUDA only).")
    # Report prompting
    instruction: str = _opt(DEFAULT_INSTRUCTION, "report: the instruction given with the image.")
    max_length: int = _opt(1024, "report: longest sequence (prompt with image tokens + report); only report text is ever cut.")
    max_images_per_study: int = _opt(2, "report: images per study for families that take several (frontal first).")
    # Optimisation
    train_batch_size: int = _opt(8, "Batch size per device.")
    gradient_accumulation_steps: int = _opt(1, "Steps to accumulate before an optimizer update.")
    max_train_steps: int | None = _opt(250, "Optimizer updates in total (overrides --num_train_epochs).")
    num_train_epochs: int | None = _opt(None, "Epochs, used when --max_train_steps is not set.")
    learning_rate: float = _opt(1e-4, "Peak learning rate.")
    scale_lr: bool = _opt(False, "Multiply the learning rate by batch size, accumulation steps and processes.")
    lr_scheduler: str = _opt("constant", "Learning-rate schedule.",
                             ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    lr_warmup_steps: int = _opt(0, "Warm-up steps of the schedule.")
    use_8bit_adam: bool = _opt(True, "bitsandbytes 8-bit AdamW (works on CPU too).")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    adam_weight_decay: float = _opt(1e-2, "AdamW weight decay.")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm.")
    mixed_precision: str | None = _opt(None, "Mixed precision (default: accelerate's config).", ["no", "fp16", "bf16"])
    gradient_checkpointing: bool = _opt(False, "Trade compute for memory.")
    snr_gamma: float | None = _opt(None, "Min-SNR weighting gamma (5.0 is the paper's choice).")
    noise_offset: float = _opt(0.0, "Noise offset scale.")
    prediction_type: str | None = _opt(None, "Override the scheduler's prediction type.", ["epsilon", "v_prediction"])
    # Validation
    validation_prompt: list[str] = _opt(
        [
            "No acute cardiopulmonary process.",
            "Cardiomegaly.",
            "Large right pleural effusion.",
            "Large left pneumothorax.",
            "Right lower lobe consolidation.",
            "Left upper lung nodule.",
        ],
        "Prompts rendered as a grid at each validation point.",
    )
    num_validation_images: int = _opt(2, "Images per validation prompt.")
    validation_steps: int | None = _opt(None, "Validate every N steps (always at the start and the end).")
    validation_epochs: int | None = _opt(None, "Validate every N epochs.")
    validation_inference_steps: int = _opt(25, "Denoising steps for validation images.")
    validation_guidance_scale: float = _opt(7.5, "Guidance scale for validation images.")
    num_validation_samples: int = _opt(8, "report: validation studies (from the val split, else held out of train).")
    validation_max_new_tokens: int = _opt(128, "report: tokens generated per validation report.")
    # Checkpoints and output
    output_dir: str = _opt("medfm-lora", "Where the adapter, checkpoints and logs go.")
    checkpointing_steps: int = _opt(500, "Save a resumable checkpoint every N steps.")
    checkpoints_total_limit: int | None = _opt(None, "Keep at most N checkpoints.")
    resume_from_checkpoint: str | None = _opt(None, "'latest' or a checkpoint folder.")
    seed: int = _opt(42, "Fixes data order, noise, and sampling.")
    report_to: str = _opt("tensorboard", "Experiment tracker.", ["tensorboard", "wandb", "all", "none"])
    logging_dir: str = _opt("logs", "Tracker folder, relative to --output_dir.")
    license: str = _opt("other", "License in the model card (use the base model's, e.g. creativeml-openrail-m).")
    dataset_description: str | None = _opt(None, "What the training data is (source, version, split, filtering), written into the model card.")
    # Hub (the token comes from HF_TOKEN or `hf auth login`, never from a flag or config key)
    push_to_hub: bool = _opt(False, "Push the final adapter (not checkpoints) to the Hub when training ends.")
    hub_model_id: str | None = _opt(None, "Hub repo for --push_to_hub, user/name (default: the --output_dir name in your namespace).")
    hub_private: bool = _opt(False, "Create the Hub repo as private.")
    # Speed and memory
    cache_latents: bool | None = _opt(None, "text-to-image: encode each image with the frozen VAE once and cache its latent distribution on disk "
                                            "(default: on).")
    cache_text_embeddings: bool | None = _opt(None, "text-to-image: encode each report with the frozen text encoder once and cache it on disk "
                                                    "(default: on unless --train_text_encoder).")
    cache_dir: str | None = _opt(None, "Folder of cached encodings, shared by runs: keyed by content, preprocessing and encoder (default: $MEDFM_HOME/cache).")
    torch_compile: bool = _opt(False, "Compile the trained model with torch.compile (inductor): faster steps after a slow first one; pays off on long runs.")
    # Text-to-image families (SD 1.x/2.x, SDXL, SD3/3.5, Flux.1, Sana, PixArt-Σ, Lumina 2; names as in diffusers' DreamBooth LoRA scripts)
    lora_layers: str | None = _opt(None, "text-to-image: comma-separated denoiser modules that get LoRA, replacing the family's default "
                                         "(attention projections), e.g. to_k,to_q,to_v,to_out.0,ff.net.0.proj,ff.net.2.")
    weighting_scheme: str = _opt("none", "text-to-image, flow-matching families (SD3, Flux.1, Sana, Lumina 2): timestep density and loss weighting.",
                                 ["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"])
    logit_mean: float = _opt(0.0, "text-to-image, flow matching: mean of the 'logit_normal' weighting scheme.")
    logit_std: float = _opt(1.0, "text-to-image, flow matching: std of the 'logit_normal' weighting scheme.")
    mode_scale: float = _opt(1.29, "text-to-image, flow matching: scale of the 'mode' weighting scheme.")
    max_sequence_length: int | None = _opt(None, "text-to-image: prompt tokens of the T5/Gemma encoder (default: the pipeline's, e.g. 300 for Sana).")
    guidance_scale: float = _opt(3.5, "text-to-image, Flux.1-dev only: the distilled guidance value fed to the transformer while training.")
    quantize_base: str | None = _opt(None, "text-to-image: QLoRA, the frozen denoiser and large text encoders quantised with bitsandbytes "
                                           "(CUDA only).", ["nf4", "int8"])
    # Methods beyond SFT: report (sft, grpo, dpo) and text-to-image (sft, dpo)
    method: str = _opt("sft", "How to train. report: sft (next-token loss on the reference reports), grpo (reports sampled per study, scored by "
                              "--reward), dpo (preference pairs from --train_data_file, TRL's JSONL format; `medfm pairs` makes them). "
                              "text-to-image: sft (the family's denoising loss) or dpo (Diffusion-DPO, Wallace et al. 2023, on image preference "
                              "pairs from --train_data_file: JSONL of prompt, chosen, rejected image paths, as `medfm study export` writes).",
                       ["sft", "grpo", "dpo"])
    init_adapter: str | None = _opt(None, "grpo/dpo: start from this adapter (folder or Hub id; e.g. an SFT one): its LoRA (and fully trained "
                                          "modules) is loaded and trained further and is the reference policy (without it the reference is the "
                                          "base, LoRA switched off); the LoRA keys (rank, target_modules, ...) are then the adapter's. "
                                          "text-to-image reads it only with --method dpo.")
    reward: dict[str, float] | None = _opt(None, "report grpo only: reward terms and weights, e.g. clinical_micro=1.0 length=0.2 rougel=0.3 (YAML: a mapping); "
                                                 "terms: clinical_micro, clinical, length, bleu4, rougel, bertscore@/local/model, radgraph/chexbert/green "
                                                 "(RadEval), package.module:function (see medfm.rewards). Default: clinical_micro=1 length=0.2 rougel=0.3.")
    num_generations: int | None = _opt(None, "report grpo only: reports sampled per study, the group its advantages are normalised in (default 8).")
    temperature: float | None = _opt(None, "report grpo only: sampling temperature (default 1.0).")
    top_p: float | None = _opt(None, "report grpo only: nucleus sampling top-p (default 1.0).")
    max_new_tokens: int | None = _opt(None, "report grpo only: longest sampled report in tokens (default 128).")
    epsilon: float | None = _opt(None, "report grpo only: the clipped ratio's range, 1 +/- epsilon (default 0.2, TRL's).")
    scale_rewards: str | None = _opt(None, "report grpo only: what each advantage (reward - its group's mean) is divided by: the group's std "
                                           "(group, TRL's default), the whole batch's std (batch: groups whose reports differ little keep "
                                           "small advantages) or nothing (none).", list(SCALE_REWARDS))
    beta: float | None = _opt(None, "report grpo and dpo only: weight of the KL to the starting policy (grpo, default 0.04) or DPO's temperature "
                                    "(dpo, default 0.1).")
    beta_dpo: float | None = _opt(None, "text-to-image dpo only: Diffusion-DPO's beta, how far the LoRA may move from the reference (default 2500, "
                                        "the paper's value for SD 1.5 with epsilon prediction; flow-matching bases may need another scale).")

    def __post_init__(self):
        for key, default in TASK_DEFAULTS.get(self.task, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, default)
        problems = []
        for key, value in (("rank", self.rank), ("train_batch_size", self.train_batch_size),
                           ("gradient_accumulation_steps", self.gradient_accumulation_steps), ("checkpointing_steps", self.checkpointing_steps)):
            if value < 1:
                problems.append(f"{key} must be >= 1, got {value}")
        if self.max_train_steps is None and self.num_train_epochs is None:
            problems.append("set max_train_steps or num_train_epochs")
        if sum(x is not None for x in (self.train_data_dir, self.train_data_file, self.dataset_name)) > 1:
            problems.append("give only one of train_data_dir, train_data_file, dataset_name")
        if self.cache_text_embeddings and self.train_text_encoder:
            problems.append("cache_text_embeddings cannot be used with train_text_encoder (the text encoder changes every step); drop one")
        problems += self._method_problems()
        if problems:
            raise ConfigError("Invalid config: " + "; ".join(problems))
        defaults = METHOD_DEFAULTS.get(self.method, {}) if self.task == "report" else TEXT_TO_IMAGE_METHOD_DEFAULTS.get(self.method, {})
        for key, default in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, dict(default) if isinstance(default, dict) else default)

    def _method_problems(self) -> list[str]:
        """Keys only some tasks and methods read, given to another (checked before the method's defaults fill them in)."""
        problems = []
        dpo = self.task == "text-to-image" and self.method == "dpo"
        if self.task == "text-to-image":
            if self.method == "grpo":
                problems.append("method 'grpo' is for task 'report'; text-to-image trains with sft or dpo")
            if self.init_adapter and not dpo:
                problems.append("init_adapter is read by text-to-image only with --method dpo; drop it or pass --method dpo")
            if dpo and self.train_text_encoder:
                problems.append("text-to-image dpo trains the denoiser's LoRA only; drop train_text_encoder (an init_adapter's text-encoder LoRA is kept)")
            if dpo and not self.train_data_file:
                problems.append("text-to-image dpo needs --train_data_file: a JSONL of prompt, chosen, rejected (`medfm study export` writes one)")
        if self.beta_dpo is not None and not dpo:
            problems.append(f"beta_dpo is read only by --task text-to-image --method dpo (this run: {self.task}, {self.method}); drop it")
        for key, methods in METHOD_KEYS.items():
            if getattr(self, key) is not None and (self.task != "report" or self.method not in methods):
                problems.append(f"{key} is read only by --task report --method {' or '.join(methods)} (this run: {self.task}, {self.method}); "
                                "drop it or change the method")
        return problems

    def to_dict(self) -> dict:
        return asdict(self)


class ConfigError(ValueError):
    """A config that cannot run: names the key and what is accepted."""


def _accepts(annotation, value) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_accepts(item, v) for v in value)
    if origin is dict:
        key, item = typing.get_args(annotation)
        return isinstance(value, dict) and all(_accepts(key, k) and _accepts(item, v) for k, v in value.items())
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def validate_values(values: dict, source: str) -> None:
    """Stop before any work on an unknown key, a wrong type or a value outside the accepted choices."""
    hints = typing.get_type_hints(TrainConfig)
    known = {f.name: f for f in fields(TrainConfig)}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}.{hint} Accepted keys: {', '.join(sorted(known))}")
        if not _accepts(hints[key], value):
            raise ConfigError(f"{source}: {key!r} must be {_type_name(hints[key])}, got {value!r} ({type(value).__name__})")
        choices = known[key].metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise ConfigError(f"{source}: {key!r} must be one of {choices}, got {value!r}")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} not found")
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    validate_values(values, str(path))
    return values


def _str_to_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _KeyValues(argparse.Action):
    """`--reward clinical=1.0 length=0.2` -> {"clinical": 1.0, "length": 0.2}."""

    def __call__(self, parser, namespace, values, option_string=None):
        pairs = [value.rpartition("=") for value in values]
        try:
            setattr(namespace, self.dest, {name: float(number) for name, _, number in pairs if name})
        except ValueError as err:
            raise argparse.ArgumentError(self, f"expected NAME=NUMBER pairs, got {' '.join(values)}") from err
        if any(not name for name, _, _ in pairs):
            raise argparse.ArgumentError(self, f"expected NAME=NUMBER pairs, got {' '.join(values)}")


def build_parser() -> argparse.ArgumentParser:
    """A flag per config key; flags left out keep the YAML or default value."""
    parser = argparse.ArgumentParser(description="LoRA-adapt a foundation model on radiology image–report pairs.", argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of config keys; flags override it.")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        annotation = hints[f.name]
        default = f.default if f.default is not MISSING else f.default_factory()
        kwargs = {"help": f"{f.metadata['help']} (default: {default})", "choices": f.metadata.get("choices")}
        is_optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        kind = next(a for a in typing.get_args(annotation) if a is not type(None)) if is_optional else annotation
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(kind) is dict:
            parser.add_argument(f"--{f.name}", nargs="+", action=_KeyValues, metavar="NAME=VALUE", **kwargs)
        elif typing.get_origin(kind) is list:
            parser.add_argument(f"--{f.name}", nargs="+", type=typing.get_args(kind)[0], **kwargs)
        else:
            parser.add_argument(f"--{f.name}", type=kind, **kwargs)
    return parser


def parse_train_config(argv: list[str] | None = None, exit_on_error: bool = True) -> TrainConfig:
    """Defaults < a built-in base's recipe < `--config FILE` < flags. A bad config ends the program with a one-line error
    (or raises ConfigError)."""
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    try:
        values = load_yaml(flags.pop("config")) if "config" in flags else {}
        values.update(flags)
        task = values.get("task", TrainConfig.task)
        base = values.get("pretrained_model_name_or_path") or TASK_DEFAULTS.get(task, {}).get("pretrained_model_name_or_path")
        own_data = any(values.get(key) for key in ("train_data_dir", "train_data_file", "dataset_name"))
        return TrainConfig(**{**({} if own_data else BUILTIN_BASE_RECIPES.get(base, {})), **values})
    except ConfigError as err:
        if not exit_on_error:
            raise
        parser.error(str(err))


def save_config(config: TrainConfig, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)


def load_config(path: str | Path) -> TrainConfig:
    return TrainConfig(**load_yaml(path))
