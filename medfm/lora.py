"""LoRA for text-to-image bases: attach to a model (each family saves and loads it in its pipeline's format: medfm.models.families)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from .models.families.base import LORA_WEIGHTS_NAME  # noqa: F401  (the adapter file's name, imported from here by callers)


def attach_lora(model: torch.nn.Module, rank: int, alpha: int | None, dropout: float, target_modules: list[str]) -> None:
    """Freeze `model` and add a trainable LoRA adapter named "default" (diffusers and transformers models have add_adapter;
    models without it, e.g. PixArt's transformer, get the same through peft's inject_adapter_in_model)."""
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=target_modules)
    if hasattr(model, "add_adapter"):
        model.add_adapter(config)
    else:
        inject_adapter_in_model(config, model)
        model.peft_config = {"default": config}


def lora_parameters(*models: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    return [p for m in models if m is not None for p in m.parameters() if p.requires_grad]


@contextmanager
def lora_disabled(model: torch.nn.Module):
    """`model` as its base inside this block: every LoRA layer switched off (peft's `disable_adapter`, also for models
    without add_adapter); on leaving, the active adapter is switched back on and trainable as before."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextmanager
def lora_weights_swapped(model: torch.nn.Module, weights: dict[str, torch.Tensor]):
    """`model` with some parameters' values replaced by `weights` (name -> tensor) inside this block (no copies: the tensors
    are swapped in and back); for a frozen reference LoRA beside the trained one without a second copy of the base."""
    parameters = dict(model.named_parameters())
    saved = {name: parameters[name].data for name in weights}
    for name, value in weights.items():
        parameters[name].data = value
    try:
        yield model
    finally:
        for name, value in saved.items():
            parameters[name].data = value
