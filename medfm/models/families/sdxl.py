"""Stable Diffusion XL: UNet with two CLIP text encoders (the second pooled) and size/crop time ids, DDPM epsilon/v prediction."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from .base import DiffusionFamily
from .registry import register


class StableDiffusionXL(DiffusionFamily):
    name = "sdxl"
    display_name = "Stable Diffusion XL"
    pipeline_class = StableDiffusionXLPipeline
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    denoiser = "unet"
    text_encoders = ("text_encoder", "text_encoder_2")
    objective = "ddpm"
    objective_summary = "DDPM noise (epsilon) or velocity (v) prediction, as the base's scheduler says"
    text_encoder_lora = True
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    recipe = "recipes/configs/sdxl-mimic-cxr.yaml"

    def prompt_token_limit(self, pipe, max_sequence_length):
        return super().prompt_token_limit(pipe, None)  # CLIP's fixed length; --max_sequence_length is for T5/Gemma encoders

    def encode_prompts(self, pipe, texts, max_sequence_length=None):
        embeds, _, pooled, _ = pipe.encode_prompt(texts, device=pipe.text_encoder_2.device, do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def prompt_settings(self, pipe, max_sequence_length):
        return super().prompt_settings(pipe, None)  # CLIP's fixed length, whatever --max_sequence_length says

    def pipeline_kwargs(self, max_sequence_length):
        return {}

    def predict(self, pipe, denoiser, latents, timesteps, conditioning, cfg):
        """Time ids as the pipeline makes them for a square image rendered at the training size: (size, crop 0, 0, size)."""
        size = latents.shape[-1] * pipe.vae_scale_factor
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=latents.device, dtype=conditioning["prompt_embeds"].dtype).repeat(latents.shape[0], 1)
        return denoiser(latents, timesteps, conditioning["prompt_embeds"], added_cond_kwargs={"text_embeds": conditioning["pooled_prompt_embeds"],
                                                                                              "time_ids": time_ids}, return_dict=False)[0]

    def build_tiny(self, seed=0):
        from ..tiny_diffusion import build_tiny_sdxl

        return build_tiny_sdxl(seed)


register(StableDiffusionXL())
