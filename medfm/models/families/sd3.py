"""Stable Diffusion 3/3.5: MMDiT, two CLIP encoders (pooled) + T5, 16-channel KL VAE with shift, rectified flow."""

from __future__ import annotations

from diffusers import StableDiffusion3Pipeline

from .base import DiffusionFamily
from .registry import register

JOINT_ATTENTION_CONTEXT = ["add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]  # the text stream's attention projections


class StableDiffusion3(DiffusionFamily):
    name = "sd3"
    display_name = "Stable Diffusion 3/3.5"
    pipeline_class = StableDiffusion3Pipeline
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    large_text_encoders = ("text_encoder_3",)
    prompt_tokenizer = "tokenizer_3"
    recipe = "recipes/configs/sd35-medium-mimic-cxr.yaml"

    def encode_prompts(self, pipe, texts, max_sequence_length=None):
        embeds, _, pooled, _ = pipe.encode_prompt(texts, None, None, device=pipe.text_encoder.device, do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length or self.default_max_sequence_length(pipe))
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def predict(self, pipe, denoiser, latents, timesteps, conditioning, cfg):
        return denoiser(hidden_states=latents, timestep=timesteps, encoder_hidden_states=conditioning["prompt_embeds"],
                        pooled_projections=conditioning["pooled_prompt_embeds"], return_dict=False)[0]

    def lora_targets(self, target_modules):
        return [*target_modules, *JOINT_ATTENTION_CONTEXT]

    def build_tiny(self, seed=0):
        from ..tiny_diffusion import build_tiny_sd3

        return build_tiny_sd3(seed)


register(StableDiffusion3())
