"""Flux.1 (dev/schnell): MMDiT on packed 2x2 latent patches with position ids, CLIP (pooled) + T5, rectified flow; dev's
transformer takes the distilled guidance value (`--guidance_scale`), schnell's none."""

from __future__ import annotations

import torch
from diffusers import FluxPipeline
from diffusers.utils.torch_utils import randn_tensor

from .base import DiffusionFamily
from .registry import register
from .sd3 import JOINT_ATTENTION_CONTEXT

QKV = (("to_q", 1), ("to_k", 1), ("to_v", 1))  # (part, output width in units of the model width) of a fused BFL linear, in order
# The kohya-ss sd-scripts layout of Flux LoRA files (BFL module names: ComfyUI, Forge, sd-scripts), as diffusers'
# _convert_kohya_flux_lora_to_diffusers reads it. BFL fuses q, k, v (and, in single blocks, the MLP input) into one linear.
KOHYA_LAYOUT = (
    (r"transformer_blocks\.(\d+)\.attn\.(to_q|to_k|to_v)", r"double_blocks_\1_img_attn_qkv", QKV),
    (r"transformer_blocks\.(\d+)\.attn\.(add_q_proj|add_k_proj|add_v_proj)", r"double_blocks_\1_txt_attn_qkv",
     (("add_q_proj", 1), ("add_k_proj", 1), ("add_v_proj", 1))),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks_\1_img_attn_proj", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks_\1_txt_attn_proj", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"double_blocks_\1_img_mlp_0", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", r"double_blocks_\1_img_mlp_2", None),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", r"double_blocks_\1_img_mod_lin", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"double_blocks_\1_txt_mlp_0", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"double_blocks_\1_txt_mlp_2", None),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", r"double_blocks_\1_txt_mod_lin", None),
    (r"single_transformer_blocks\.(\d+)\.(?:attn\.)?(to_q|to_k|to_v|proj_mlp)", r"single_blocks_\1_linear1", (*QKV, ("proj_mlp", 4))),
    (r"single_transformer_blocks\.(\d+)\.proj_out", r"single_blocks_\1_linear2", None),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", r"single_blocks_\1_modulation_lin", None),
)


class Flux(DiffusionFamily):
    name = "flux"
    display_name = "Flux.1"
    pipeline_class = FluxPipeline
    pipeline_class_names = ("FluxPipeline",)
    text_encoders = ("text_encoder", "text_encoder_2")
    large_text_encoders = ("text_encoder_2",)
    prompt_tokenizer = "tokenizer_2"
    kohya_prefixes = {"transformer": "lora_unet_"}
    kohya_layout = KOHYA_LAYOUT
    recipe = "recipes/configs/flux1-dev-mimic-cxr-qlora.yaml"

    def encode_prompts(self, pipe, texts, max_sequence_length=None):
        embeds, pooled, _ = pipe.encode_prompt(texts, None, device=pipe.text_encoder.device,
                                               max_sequence_length=max_sequence_length or self.default_max_sequence_length(pipe))
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def predict(self, pipe, denoiser, latents, timesteps, conditioning, cfg):
        """Pack the latents into 2x2 patches with their position ids, as FluxPipeline does, and unpack the prediction."""
        batch, channels, height, width = latents.shape
        packed = pipe._pack_latents(latents, batch, channels, height, width)
        image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
        embeds = conditioning["prompt_embeds"]
        text_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = torch.full((batch,), cfg.guidance_scale, device=latents.device, dtype=torch.float32) if pipe.transformer.config.guidance_embeds else None
        prediction = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, pooled_projections=conditioning["pooled_prompt_embeds"],
                              encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return pipe._unpack_latents(prediction, height * pipe.vae_scale_factor, width * pipe.vae_scale_factor, pipe.vae_scale_factor)

    def lora_targets(self, target_modules):
        return [*target_modules, *JOINT_ATTENTION_CONTEXT]

    def native_resolution(self, pipe) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor

    def initial_noise(self, pipe, num_images, seed, resolution):
        """FluxPipeline's draw: (n, channels, h, w) noise, then packed into 2x2 patches (the layout its `latents=` takes)."""
        size = 2 * (resolution // (pipe.vae_scale_factor * 2))
        channels = pipe.transformer.config.in_channels // 4
        noise = randn_tensor((num_images, channels, size, size), generator=torch.Generator().manual_seed(seed), dtype=pipe.transformer.dtype)
        return pipe._pack_latents(noise, num_images, channels, size, size)

    def build_tiny(self, seed=0):
        from ..tiny_diffusion import build_tiny_flux

        return build_tiny_flux(seed)


register(Flux())
