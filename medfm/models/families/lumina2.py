"""Lumina Image 2.0: unified next-DiT, Gemma 2 encoder with the pipeline's system prompt, rectified flow on reversed time
(the transformer sees t = 1 - sigma and predicts x0 - noise; the pipeline negates it)."""

from __future__ import annotations

from diffusers import Lumina2Pipeline

from .base import MaskedPromptFamily
from .registry import register


class Lumina2(MaskedPromptFamily):
    name = "lumina2"
    display_name = "Lumina Image 2.0"
    pipeline_class = Lumina2Pipeline
    pipeline_class_names = ("Lumina2Pipeline", "Lumina2Text2ImgPipeline")
    large_text_encoders = ("text_encoder",)

    def prompt_settings(self, pipe, max_sequence_length):
        """The system prompt Lumina2Pipeline puts before every caption (`pipe.system_prompt`, what encode_prompt reads) is part of the text."""
        return {**super().prompt_settings(pipe, max_sequence_length), "system_prompt": pipe.system_prompt}

    def predict(self, pipe, denoiser, latents, timesteps, conditioning, cfg):
        timestep = 1 - timesteps / pipe.scheduler.config.num_train_timesteps
        return -denoiser(hidden_states=latents, timestep=timestep, encoder_hidden_states=conditioning["prompt_embeds"],
                         encoder_attention_mask=conditioning["prompt_attention_mask"], return_dict=False)[0]

    def build_tiny(self, seed=0):
        from ..tiny_diffusion import build_tiny_lumina2

        return build_tiny_lumina2(seed)


register(Lumina2())
