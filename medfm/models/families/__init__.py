"""Text-to-image families: one entry per pipeline family (import this package to register them all)."""

from . import flux, lumina2, pixart, sana, sd, sd3, sdxl  # noqa: F401  (each module registers its family)
from .base import LORA_WEIGHTS_NAME, DiffusionFamily
from .registry import DIFFUSION_FAMILIES, detect_family, family_for_pipeline

__all__ = ["DIFFUSION_FAMILIES", "LORA_WEIGHTS_NAME", "DiffusionFamily", "detect_family", "family_for_pipeline"]
