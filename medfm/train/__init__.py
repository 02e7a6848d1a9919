"""Training recipes, one per task."""

from __future__ import annotations

from ..config import TrainConfig


def recipe_for(config: TrainConfig):
    """The recipe class that trains `config.task`."""
    if config.task == "text-to-image" and config.method == "dpo":
        from .text_to_image_dpo import TextToImageDPORecipe

        return TextToImageDPORecipe(config)
    if config.task == "text-to-image":
        from .text_to_image import TextToImageLoRARecipe

        return TextToImageLoRARecipe(config)
    if config.task == "report" and config.method == "grpo":
        from .grpo import GRPOReportRecipe

        return GRPOReportRecipe(config)
    if config.task == "report" and config.method == "dpo":
        from .dpo import DPOReportRecipe

        return DPOReportRecipe(config)
    if config.task == "report":
        from .report import ReportLoRARecipe

        return ReportLoRARecipe(config)
    raise ValueError(f"Unknown task {config.task!r}")
