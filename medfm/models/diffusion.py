"""Text-to-image bases: the built-in tiny Stable Diffusion (built offline, shipped weights) and loading any family by Hub id or folder."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..config import BUILTIN_TINY_SD
from ..paths import build_once, medfm_home
from .families import detect_family
from .shipped import load_shipped_weights, shipped_fingerprint, unpinned_name
from .tokenizers import clip_tokenizer

TINY_SD_VERSION = "2"
TINY_VOCAB_MERGES = 8000
SHIPPED_TINY_SD = "tiny-sd"


def build_tiny_sd_pipeline(prediction_type: str = "epsilon", seed: int = 0) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline of about 6.5M parameters, built from configs (random weights, fixed by seed).

    Same classes as SD 1.x at 128 px (VAE factor 8, 16x16 latents, cross-attention at 8x8 and 4x4);
    `prediction_type="v_prediction"` with linear-projection attention is the SD 2.x shape.
    """
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(num_merges=TINY_VOCAB_MERGES)
    sd2 = prediction_type == "v_prediction"
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length, projection_dim=128, hidden_act="gelu" if sd2 else "quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, sample_size=128,
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128, attention_head_dim=(4, 4, 8) if sd2 else 8, use_linear_projection=sd2, norm_num_groups=16,
    )
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, prediction_type=prediction_type)
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1, **schedule)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def pretrained_modules(pipe: StableDiffusionPipeline) -> dict[str, torch.nn.Module]:
    """The modules whose weights pretraining learns and `medfm/bases/tiny-sd.safetensors` ships."""
    return {"vae": pipe.vae, "text_encoder": pipe.text_encoder, "unet": pipe.unet}


def build_pretrained_tiny_sd() -> StableDiffusionPipeline:
    """The built-in base: the tiny architecture with the shipped weights pretrained on phantoms."""
    pipe = build_tiny_sd_pipeline()
    metadata = load_shipped_weights(pretrained_modules(pipe), SHIPPED_TINY_SD, TINY_SD_VERSION)
    pipe.vae.register_to_config(scaling_factor=float(metadata["vae_scaling_factor"]))
    return pipe


def materialize_builtin_base(name: str = BUILTIN_TINY_SD) -> Path:
    """Write the built-in base once as a normal diffusers folder under medfm_home() and return its path."""
    if name != BUILTIN_TINY_SD:
        raise ValueError(f"Unknown built-in base {name!r}; the built-in is {BUILTIN_TINY_SD!r}")
    target = medfm_home() / "bases" / f"tiny-sd-v{TINY_SD_VERSION}-{shipped_fingerprint(SHIPPED_TINY_SD)}"
    return build_once(target, "model_index.json", lambda folder: build_pretrained_tiny_sd().save_pretrained(folder))


def resolve_base(name_or_path: str) -> str:
    """The Hub id or folder to load: built-in names (optionally pinned to their weights, `builtin:tiny-sd@<sha>`) become their local folder."""
    if name_or_path.startswith("builtin:"):
        return str(materialize_builtin_base(unpinned_name(name_or_path, SHIPPED_TINY_SD)))
    return name_or_path


def load_pipeline(path: str, revision: str | None = None, variant: str | None = None, **components) -> DiffusionPipeline:
    """A base's text-to-image pipeline, its family detected from model_index.json (SD without the safety checker: it blanks radiographs)."""
    return detect_family(path, revision).load_pipeline(path, revision, variant, **components)
