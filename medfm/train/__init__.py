"""Training recipes, one per (task, method)."""

from __future__ import annotations

from importlib import import_module

from ..config import TrainConfig

RECIPES = {  # (task, method) -> "module:class" in this package, imported only when chosen
    ("text-to-image", "sft"): "text_to_image:TextToImageLoRARecipe",
    ("text-to-image", "dpo"): "text_to_image_dpo:TextToImageDPORecipe",
    ("report", "sft"): "report:ReportLoRARecipe",
    ("report", "grpo"): "grpo:GRPOReportRecipe",
    ("report", "dpo"): "dpo:DPOReportRecipe",
}


def recipe_for(config: TrainConfig):
    """The recipe that trains `config.task` with `config.method`."""
    try:
        module, name = RECIPES[config.task, config.method].split(":")
    except KeyError:
        raise ValueError(f"No recipe for task {config.task!r} with method {config.method!r}; supported: {sorted(RECIPES)}") from None
    return getattr(import_module(f".{module}", __name__), name)(config)
