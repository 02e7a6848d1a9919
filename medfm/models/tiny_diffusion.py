"""Tiny offline text-to-image pipelines of the modern families (SDXL, SD3, Flux.1, Sana, PixArt-Σ, Lumina 2), built from configs.

Each builder returns the family's own diffusers pipeline with random weights fixed by `seed`: the real classes and
component layout (so `save_pretrained` writes a folder that `DiffusionPipeline.from_pretrained` reads as that family),
shrunk to a few hundred thousand to ~2M parameters per component, 64 px native images, 8x8 latents. Shapes follow
diffusers' own pipeline tests; tokenizers are built offline (`medfm.models.tokenizers`). For tests and benchmarks:
the weights are random, so the images are noise until something is trained.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, Gemma2Config, Gemma2Model, T5Config, T5EncoderModel

from .tokenizers import clip_tokenizer, gemma_tokenizer, t5_tokenizer

TINY_RESOLUTION = 64
TINY_CLIP_MERGES = 8000  # as the built-in tiny SD: report words split into whole or near-whole pieces
LATENT_SIZE = 8  # 64 px through a factor-8 VAE, as every real base here but Sana (factor 32)
# 1 / std of the random tiny KL VAE's phantom latents (about 0.3), as a real base's factor is 1 / std of its VAE's latents: the
# denoiser sees unit-variance latents. The real factors (SDXL 0.13025, SD3 1.5035) left them at std 0.04 / 0.5, too faint to learn fast.
TINY_VAE_SCALING_FACTOR = 3.2


def _as_loaded(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Every module in eval mode, as `from_pretrained` leaves them (T5's dropout would otherwise make prompts random)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _clip_text_encoder(tokenizer, hidden_size: int, with_projection: bool) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=hidden_size, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _t5_encoder(tokenizer, d_model: int = 64) -> T5EncoderModel:
    """A T5 v1.1-style encoder (gated GELU, as the T5-XXL that SD3, Flux and PixArt-Σ use)."""
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
        )
    )


def _gemma2_encoder(tokenizer, hidden_size: int = 32) -> Gemma2Model:
    return Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=tokenizer.model_max_length, sliding_window=256,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    )


def _vae(latent_channels: int, flow: bool = False) -> AutoencoderKL:
    """A factor-8 AutoencoderKL; `flow=True` is the SD3/Flux layout (no quant convs, a shift factor)."""
    shift = dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609) if flow else {}
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, sample_size=TINY_RESOLUTION,
        scaling_factor=TINY_VAE_SCALING_FACTOR, **shift,
    )


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL: UNet with size/crop time ids ("text_time"), CLIP-L-like + CLIP-G-like (with projection) encoders, Euler scheduler."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = clip_tokenizer(num_merges=TINY_CLIP_MERGES)
        text_encoder = _clip_text_encoder(tokenizer, 32, with_projection=False)
        text_encoder_2 = _clip_text_encoder(tokenizer, 64, with_projection=True)
        unet = UNet2DConditionModel(
            sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2), norm_num_groups=16,
            cross_attention_dim=32 + 64,  # both encoders' penultimate hidden states, concatenated
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 64,  # six time ids + the pooled CLIP-G-like embedding
        )
        vae = _vae(4)
        vae.register_to_config(force_upcast=True)  # as SDXL's own VAE (fp16 overflows without the fp16-fix VAE)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=clip_tokenizer(num_merges=TINY_CLIP_MERGES),
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    return _as_loaded(pipe)


def build_tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3/3.5: MMDiT on 16-channel latents (patch 2), two CLIP encoders with projection + T5, rectified-flow Euler (shift 3)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer, t5 = clip_tokenizer(num_merges=TINY_CLIP_MERGES), t5_tokenizer()
        text_encoder = _clip_text_encoder(tokenizer, 32, with_projection=True)
        text_encoder_2 = _clip_text_encoder(tokenizer, 32, with_projection=True)
        text_encoder_3 = _t5_encoder(t5, d_model=64)
        transformer = SD3Transformer2DModel(
            sample_size=LATENT_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=4,
            joint_attention_dim=64,  # T5's width; the two CLIP sequences (32 + 32) are zero-padded to it, as in SD3
            caption_projection_dim=128, pooled_projection_dim=32 + 32, pos_embed_max_size=4,
        )
        vae = _vae(16, flow=True)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(num_merges=TINY_CLIP_MERGES),
        text_encoder_3=text_encoder_3, tokenizer_3=t5,
    )
    return _as_loaded(pipe)


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """Flux.1: MM-DiT + single-stream blocks on packed 2x2 patches of 16-channel latents, CLIP (pooled) + T5.

    `guidance_embeds=True` is FLUX.1-dev's distilled-guidance input with its resolution-dependent shift;
    `False` is FLUX.1-schnell (no guidance input, shift 1).
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer, t5 = clip_tokenizer(num_merges=TINY_CLIP_MERGES), t5_tokenizer()
        text_encoder = _clip_text_encoder(tokenizer, 32, with_projection=False)
        text_encoder_2 = _t5_encoder(t5, d_model=64)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16 * 4, num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
            joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(8, 12, 12),
        )
        vae = _vae(16, flow=True)
    if guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=t5,
    )
    return _as_loaded(pipe)


def build_tiny_sana(seed: int = 0) -> SanaPipeline:
    """Sana: linear-attention DiT on a deep-compression autoencoder (AutoencoderDC), Gemma 2 encoder, rectified flow (shift 3).

    The tiny AutoencoderDC compresses by 8 (Sana's own by 32) so 64 px images still give 8x8 latents.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = gemma_tokenizer()
        text_encoder = _gemma2_encoder(tokenizer, hidden_size=32)
        transformer = SanaTransformer2DModel(
            in_channels=8, out_channels=8, patch_size=1, num_layers=2, num_attention_heads=2, attention_head_dim=32,
            num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=32, sample_size=LATENT_SIZE,
        )
        vae = AutoencoderDC(
            in_channels=3, latent_channels=8, attention_head_dim=8,
            encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(8, 16, 32, 32),
            encoder_qkv_multiscales=((), (), (5,), (5,)), decoder_qkv_multiscales=((), (), (5,), (5,)),
            encoder_layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
            downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
            scaling_factor=0.41407,  # Sana's DC-AE f32c32 factor
        )
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return _as_loaded(pipe)


def build_tiny_pixart_sigma(seed: int = 0) -> PixArtSigmaPipeline:
    """PixArt-Σ: DiT with adaLN-single and a learned variance (out_channels = 2 x latent channels), T5 encoder, DDPM (epsilon)
    trained, sampled with the DPM-Solver++ scheduler that PixArt-Σ ships."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = t5_tokenizer()
        text_encoder = _t5_encoder(tokenizer, d_model=64)
        transformer = PixArtTransformer2DModel(
            sample_size=LATENT_SIZE, num_layers=2, patch_size=2, attention_head_dim=32, num_attention_heads=2, caption_channels=64,
            in_channels=4, out_channels=8, cross_attention_dim=64, attention_bias=True, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            use_additional_conditions=False,  # PixArt-Σ has no size/aspect-ratio embedding (PixArt-α 1024 has)
        )
        vae = _vae(4)
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=DPMSolverMultistepScheduler())
    return _as_loaded(pipe)


def build_tiny_lumina2(seed: int = 0) -> Lumina2Pipeline:
    """Lumina Image 2.0: unified next-DiT on 16-channel latents (Flux's VAE layout), Gemma 2 encoder, rectified flow."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = gemma_tokenizer()
        text_encoder = _gemma2_encoder(tokenizer, hidden_size=32)
        transformer = Lumina2Transformer2DModel(
            sample_size=LATENT_SIZE, patch_size=2, in_channels=16, hidden_size=128, num_layers=2, num_refiner_layers=1, num_attention_heads=4,
            num_kv_heads=1, multiple_of=16, norm_eps=1e-5, axes_dim_rope=(8, 12, 12), axes_lens=(300, 32, 32), cap_feat_dim=32,
        )
        vae = _vae(16, flow=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=6.0)
    pipe = Lumina2Pipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    return _as_loaded(pipe)


TINY_DIFFUSION_BUILDERS: dict[str, Callable[..., DiffusionPipeline]] = {
    "sdxl": build_tiny_sdxl,
    "sd3": build_tiny_sd3,
    "flux": build_tiny_flux,
    "sana": build_tiny_sana,
    "pixart-sigma": build_tiny_pixart_sigma,
    "lumina2": build_tiny_lumina2,
}
