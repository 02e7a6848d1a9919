"""LoRA-adapt a Stable Diffusion-family model on radiograph–report pairs (RoentGen's recipe, made cheap)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers.training_utils import cast_training_params, compute_snr
from diffusers.utils import make_image_grid
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.data import DataLoader

from ..config import TrainConfig
from ..data.pairs import ImageReportDataset, collate_pairs, load_pairs
from ..hub import write_text_to_image_card
from ..lora import attach_lora, load_lora_adapter, save_lora_adapter
from ..models.diffusion import load_diffusion_components, load_pipeline, resolve_base
from .base import LoRARecipe

logger = get_logger(__name__)


class TextToImageLoRARecipe(LoRARecipe):
    tracker_name = "medfm-text-to-image-lora"

    def _setup_models(self) -> None:
        cfg = self.config
        with self.accelerator.main_process_first():
            self.base = resolve_base(cfg.pretrained_model_name_or_path)
        parts = load_diffusion_components(self.base, cfg.revision, cfg.variant)
        self.tokenizer, self.noise_scheduler = parts.tokenizer, parts.noise_scheduler
        self.vae, self.text_encoder, self.unet = parts.vae, parts.text_encoder, parts.unet
        self.resolution = cfg.resolution or parts.native_resolution
        if cfg.prediction_type:
            self.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)

        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        attach_lora(self.unet, cfg.rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
        if cfg.train_text_encoder:
            attach_lora(self.text_encoder, cfg.rank, cfg.lora_alpha, cfg.lora_dropout, cfg.text_encoder_target_modules)

        device = self.accelerator.device
        for model in (self.vae, self.text_encoder, self.unet):
            model.to(device)
            if self.weight_dtype != torch.float32:
                model.to(dtype=self.weight_dtype)
        cast_training_params([self.unet, self.text_encoder], dtype=torch.float32)  # LoRA weights train in fp32
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()

    def _setup_data(self) -> None:
        cfg = self.config
        with self.accelerator.main_process_first():
            pairs = load_pairs(cfg.train_data_dir, cfg.train_data_file, cfg.dataset_name, cfg.dataset_config_name,
                               cfg.image_column, cfg.caption_column, cfg.image_root, cfg.phantom_num_images)
        if cfg.max_train_samples:
            pairs = pairs[: cfg.max_train_samples]
        self.dataset = ImageReportDataset(pairs, self.resolution, self.tokenizer, cfg.report_section, self.quarantine, cfg.verify_images)
        logger.info(f"{len(self.dataset)} usable pairs of {len(pairs)}; {len(self.quarantine.rows)} skipped; "
                    f"{self.dataset.num_truncated} reports cut at a sentence boundary to fit {self.tokenizer.model_max_length} tokens")
        self.train_dataloader = DataLoader(
            self.dataset, batch_size=cfg.train_batch_size, shuffle=True, collate_fn=collate_pairs,
            num_workers=cfg.dataloader_num_workers, pin_memory=torch.cuda.is_available(),
        )

    def trainable_models(self) -> list[torch.nn.Module]:
        return [self.unet, self.text_encoder] if self.config.train_text_encoder else [self.unet]

    def _set_prepared_models(self, models: list[torch.nn.Module]) -> None:
        self.unet, *rest = models
        if rest:
            self.text_encoder = rest[0]

    def _models_by_role(self, models) -> dict:
        unet_class = type(self.accelerator.unwrap_model(self.unet))
        return {"unet" if isinstance(m, unet_class) else "text_encoder": m for m in models}

    def save_lora(self, models, directory) -> None:
        save_lora_adapter(directory, **self._models_by_role(models))

    def load_lora(self, models, directory) -> None:
        load_lora_adapter(directory, **self._models_by_role(models))

    # ------------------------------------------------------------------------------------------------ train
    def training_step(self, batch: dict) -> torch.Tensor:
        """The denoising loss of one batch (epsilon or v target, optional min-SNR weighting)."""
        cfg, generator = self.config, self.generator
        pixel_values = batch["pixel_values"].to(self.accelerator.device, dtype=self.weight_dtype)
        with torch.no_grad():
            latents = self.vae.encode(pixel_values).latent_dist.sample(generator=generator) * self.vae.config.scaling_factor
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if cfg.noise_offset:
            noise += cfg.noise_offset * randn_tensor((*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        timesteps = timesteps.to(latents.device)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = self.text_encoder(batch["input_ids"].to(latents.device), return_dict=False)[0]

        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"Unsupported prediction type {prediction_type!r}; use epsilon or v_prediction")
        model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]

        if cfg.snr_gamma is None:
            return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        snr = compute_snr(self.noise_scheduler, timesteps)
        weights = torch.stack([snr, cfg.snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=list(range(1, model_pred.ndim)))
        return (loss * weights).mean()

    # ------------------------------------------------------------------------------------------------ outputs
    def _run_validation(self) -> Path | None:
        """Render every validation prompt at a fixed seed; save the grid and log it to TensorBoard."""
        cfg, accelerator = self.config, self.accelerator
        if not cfg.validation_prompt or not accelerator.is_main_process:
            return None
        unet = accelerator.unwrap_model(self.unet)
        text_encoder = accelerator.unwrap_model(self.text_encoder)
        pipe = load_pipeline(self.base, cfg.revision, cfg.variant, unet=unet, text_encoder=text_encoder, vae=self.vae, tokenizer=self.tokenizer)
        pipe.set_progress_bar_config(disable=True)
        unet.eval()
        with torch.no_grad(), accelerator.autocast():
            images = pipe(cfg.validation_prompt, num_images_per_prompt=cfg.num_validation_images, height=self.resolution, width=self.resolution,
                          num_inference_steps=cfg.validation_inference_steps, guidance_scale=cfg.validation_guidance_scale,
                          generator=torch.Generator().manual_seed(cfg.seed)).images
        unet.train()
        grid = make_image_grid(images, rows=len(cfg.validation_prompt), cols=cfg.num_validation_images)
        path = self.output_dir / "validation" / f"step-{self.progress.global_step:06d}.png"
        path.parent.mkdir(exist_ok=True)
        grid.save(path)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), self.progress.global_step, dataformats="NHWC")
        return path

    def _save_adapter_weights(self) -> None:
        unet = self.accelerator.unwrap_model(self.unet)
        text_encoder = self.accelerator.unwrap_model(self.text_encoder) if self.config.train_text_encoder else None
        save_lora_adapter(self.output_dir, unet, text_encoder)

    def _write_model_card(self, resolved: TrainConfig, validation: Path | None) -> None:
        write_text_to_image_card(self.output_dir, resolved, self.base, num_pairs=len(self.dataset), num_bad=len(self.quarantine.rows),
                                 validation_image=validation.relative_to(self.output_dir).as_posix() if validation else None)
