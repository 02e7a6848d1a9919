"""Lumina Image 2.0: unified next-DiT, Gemma 2 encoder with the pipeline's system prompt, rectified flow on reversed time
(the transformer sees t = 1 - sigma and predicts x0 - noise; the pipeline negates it)."""

from __future__ import annotations

from diffusers import Lumina2Pipeline

from .base import MaskedPromptFamily
from .registry import register

MIN_CAPTION_TOKENS = 16  # fewer cannot hold a finding sentence: a shorter --max_sequence_length is a mistake, not a choice


class Lumina2(MaskedPromptFamily):
    name = "lumina2"
    display_name = "Lumina Image 2.0"
    pipeline_class = Lumina2Pipeline
    pipeline_class_names = ("Lumina2Pipeline", "Lumina2Text2ImgPipeline")
    large_text_encoders = ("text_encoder",)

    def prompt_token_limit(self, pipe, max_sequence_length):
        """Lumina2Pipeline encodes `<system prompt> <Prompt Start> <caption>` within max_sequence_length: the caption gets what
        the system prompt leaves (counted alone, which is at most what it takes in front of a caption)."""
        tokenizer, length = super().prompt_token_limit(pipe, max_sequence_length)
        prefix = len(tokenizer(f"{pipe.system_prompt} <Prompt Start> ", add_special_tokens=False).input_ids)  # as encode_prompt joins them
        if length - prefix < MIN_CAPTION_TOKENS:
            raise ValueError(f"--max_sequence_length {length + tokenizer.num_special_tokens_to_add()} leaves the caption {length - prefix} "
                             f"tokens: Lumina 2's pipeline puts its {prefix}-token system prompt in front of every caption within that "
                             f"length. Use at least {prefix + MIN_CAPTION_TOKENS + tokenizer.num_special_tokens_to_add()}, or leave it "
                             f"unset for the pipeline's {self.default_max_sequence_length(pipe)}.")
        return tokenizer, length - prefix

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
