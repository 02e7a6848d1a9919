"""Stable Diffusion 1.x/2.x: CLIP text encoder, UNet, KL VAE, DDPM epsilon or v prediction."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline

from .base import DiffusionFamily
from .registry import register


class StableDiffusion(DiffusionFamily):
    name = "sd"
    display_name = "Stable Diffusion 1.x/2.x"
    pipeline_class = StableDiffusionPipeline
    pipeline_class_names = ("StableDiffusionPipeline",)
    denoiser = "unet"
    objective = "ddpm"
    text_encoder_lora = True
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    recipe = "recipes/configs/sd15-mimic-cxr.yaml"
    objective_summary = "DDPM noise (epsilon) or velocity (v) prediction, as the base's scheduler says"
    loading_extra = ", safety_checker=None"

    def load_pipeline(self, path, revision=None, variant=None, **components):
        """Without the safety checker: it blanks radiographs as 'NSFW'."""
        return super().load_pipeline(path, revision, variant, safety_checker=None, requires_safety_checker=False, **components)

    def prompt_token_limit(self, pipe, max_sequence_length):
        return super().prompt_token_limit(pipe, None)  # CLIP's fixed length; --max_sequence_length is for T5/Gemma encoders

    def encode_prompts(self, pipe, texts, max_sequence_length=None):
        tokenizer = pipe.tokenizer
        ids = tokenizer(texts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids
        return {"encoder_hidden_states": pipe.text_encoder(ids.to(pipe.text_encoder.device), return_dict=False)[0]}

    def prompt_settings(self, pipe, max_sequence_length):
        return {"output": "last_hidden_state"}

    def pipeline_kwargs(self, max_sequence_length):
        return {}

    def card_call_arguments(self, resolution, max_sequence_length):
        return ""  # the UNet's native size is the pipeline's default

    def predict(self, pipe, denoiser, latents, timesteps, conditioning, cfg) -> torch.Tensor:
        return denoiser(latents, timesteps, conditioning["encoder_hidden_states"], return_dict=False)[0]

    def build_tiny(self, seed=0):
        from ..diffusion import build_tiny_sd_pipeline

        return build_tiny_sd_pipeline(seed=seed)


register(StableDiffusion())
