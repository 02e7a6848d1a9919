"""Sana (0.6B/1.6B): linear-attention DiT on a deep-compression autoencoder (AutoencoderDC), Gemma 2 text encoder with
SanaPipeline's chat-style complex human instruction, rectified flow."""

from __future__ import annotations

import torch
from diffusers import SanaPipeline
from diffusers.utils.torch_utils import randn_tensor

from .base import MaskedPromptFamily, call_default
from .registry import register

COMPLEX_HUMAN_INSTRUCTION = call_default(SanaPipeline, "complex_human_instruction")  # what a plain pipe(prompt) prepends


class Sana(MaskedPromptFamily):
    name = "sana"
    display_name = "Sana"
    pipeline_class = SanaPipeline
    pipeline_class_names = ("SanaPipeline",)
    large_text_encoders = ("text_encoder",)
    recipe = "recipes/configs/sana-0.6b-mimic-cxr.yaml"
    encode_prompt_kwargs = {"complex_human_instruction": COMPLEX_HUMAN_INSTRUCTION}

    def prompt_token_limit(self, pipe, max_sequence_length):
        """The pipeline keeps the instruction's first token and the last max_sequence_length - 1 tokens: the report gets max_sequence_length - 2."""
        return pipe.tokenizer, (max_sequence_length or self.default_max_sequence_length(pipe)) - 2

    def pipeline_kwargs(self, max_sequence_length):
        """Render at the asked size (no aspect-ratio binning), prompts encoded as in training."""
        return {"use_resolution_binning": False, **super().pipeline_kwargs(max_sequence_length)}

    def encode_images(self, vae, pixels):
        """AutoencoderDC is deterministic: one latent per image, no distribution."""
        return [{"latent_mean": latent} for latent in vae.encode(pixels).latent]

    def predict(self, pipe, denoiser, latents, timesteps, conditioning, cfg):
        prediction = denoiser(latents, encoder_hidden_states=conditioning["prompt_embeds"], encoder_attention_mask=conditioning["prompt_attention_mask"],
                              timestep=timesteps * pipe.transformer.config.timestep_scale, return_dict=False)[0]
        if pipe.transformer.config.out_channels // 2 == latents.shape[1]:  # learned sigma, dropped as the pipeline does
            prediction = prediction.chunk(2, dim=1)[0]
        return prediction

    def initial_noise(self, pipe, num_images, seed, resolution):
        size = self.latent_size(pipe, resolution)
        shape = (num_images, pipe.transformer.config.in_channels, size, size)
        return randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)  # SanaPipeline draws in float32

    def build_tiny(self, seed=0):
        from ..tiny_diffusion import build_tiny_sana

        return build_tiny_sana(seed)


register(Sana())
