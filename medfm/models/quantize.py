"""QLoRA for text-to-image bases: the frozen denoiser and large text encoders loaded in 4-bit NF4 or 8-bit by bitsandbytes."""

from __future__ import annotations

import torch

QUANT_BACKENDS = {"nf4": "bitsandbytes_4bit", "int8": "bitsandbytes_8bit"}


def pipeline_quantization(family, cfg, device: torch.device, compute_dtype: torch.dtype) -> dict:
    """`quantization_config=` for the family's pipeline.from_pretrained under --quantize_base (empty without it).

    Quantised: the denoiser and the family's large text encoders (T5, Gemma 2); the VAE and CLIP encoders stay as they are.
    """
    if not cfg.quantize_base:
        return {}
    if device.type != "cuda":
        raise ValueError(f"--quantize_base {cfg.quantize_base} needs a CUDA GPU (bitsandbytes 4-/8-bit layers); this run is on {device.type}. "
                         "Drop --quantize_base (and use --mixed_precision bf16 --gradient_checkpointing to save memory instead).")
    from diffusers.quantizers import PipelineQuantizationConfig

    kwargs = ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute_dtype}
              if cfg.quantize_base == "nf4" else {"load_in_8bit": True})
    return {"quantization_config": PipelineQuantizationConfig(quant_backend=QUANT_BACKENDS[cfg.quantize_base], quant_kwargs=kwargs,
                                                              components_to_quantize=[family.denoiser, *family.large_text_encoders])}
