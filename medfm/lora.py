"""LoRA for text-to-image bases: attach, save in diffusers' format, load back into training models."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import _set_state_dict_into_text_encoder
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def attach_lora(model: torch.nn.Module, rank: int, alpha: int | None, dropout: float, target_modules: list[str]) -> None:
    """Freeze `model` and add a trainable LoRA adapter (diffusers and transformers models both have add_adapter)."""
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=target_modules)
    model.add_adapter(config)


def lora_parameters(*models: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    return [p for m in models if m is not None for p in m.parameters() if p.requires_grad]


def save_lora_adapter(directory: str | Path, unet, text_encoder=None) -> None:
    """Write `pytorch_lora_weights.safetensors` as `pipe.load_lora_weights(directory)` expects (with LoRA alpha metadata)."""
    kwargs = {
        "unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
    }
    if text_encoder is not None:
        kwargs["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
        kwargs["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(directory, weight_name=LORA_WEIGHTS_NAME, **kwargs)


def load_lora_adapter(directory: str | Path, unet, text_encoder=None) -> None:
    """Load weights written by save_lora_adapter into models that already carry a LoRA adapter."""
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(str(directory), weight_name=LORA_WEIGHTS_NAME)
    unet_state = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    incompatible = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    if incompatible is not None and getattr(incompatible, "unexpected_keys", None):
        raise ValueError(f"{directory}: LoRA keys that do not fit the UNet: {incompatible.unexpected_keys[:5]}")
    if text_encoder is not None:
        _set_state_dict_into_text_encoder(state_dict, prefix="text_encoder.", text_encoder=text_encoder)
