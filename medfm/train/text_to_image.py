"""LoRA-adapt a Stable Diffusion-family model on radiograph–report pairs (RoentGen's recipe, made cheap).

One class, torchtune style: `setup()` builds everything in small `_setup_*` steps, `train()` is the whole
loop in one place, `save_adapter()` writes the shareable folder, `cleanup()` closes trackers.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, gather_object, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr
from diffusers.utils import make_image_grid
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import TrainConfig, save_config
from ..data.pairs import BadRow, ImageReportDataset, Quarantine, collate_pairs, load_pairs
from ..hub import write_text_to_image_card
from ..lora import attach_lora, load_lora_adapter, lora_parameters, save_lora_adapter
from ..models.diffusion import load_diffusion_components, load_pipeline, resolve_base
from .checkpoints import TrainingProgress, find_checkpoint, prune_checkpoints

logger = get_logger(__name__)


class TextToImageLoRARecipe:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        self._setup_accelerator()
        self._setup_models()
        self._setup_data()
        self._setup_optimizer()
        self.unet, self.optimizer, self.train_dataloader, self.lr_scheduler = self.accelerator.prepare(
            self.unet, self.optimizer, self.train_dataloader, self.lr_scheduler
        )
        if self.config.train_text_encoder:
            self.text_encoder = self.accelerator.prepare(self.text_encoder)
        self._setup_schedule()
        self._setup_checkpointing()

    def _setup_accelerator(self) -> None:
        cfg = self.config
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / cfg.logging_dir)),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        )
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        set_seed(cfg.seed)  # LoRA initialisation
        # Every random draw of training (VAE sampling, noise, timesteps) comes from this generator,
        # so a resumed run continues exactly where it stopped.
        self.generator = torch.Generator().manual_seed(cfg.seed + self.accelerator.process_index)

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

        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)
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
        self.quarantine = Quarantine(strict=cfg.strict)
        self.dataset = ImageReportDataset(pairs, self.resolution, self.tokenizer, cfg.report_section, self.quarantine, cfg.verify_images)
        logger.info(f"{len(self.dataset)} usable pairs of {len(pairs)}; {len(self.quarantine.rows)} skipped; "
                    f"{self.dataset.num_truncated} reports cut at a sentence boundary to fit {self.tokenizer.model_max_length} tokens")
        self.train_dataloader = DataLoader(
            self.dataset, batch_size=cfg.train_batch_size, shuffle=True, collate_fn=collate_pairs,
            num_workers=cfg.dataloader_num_workers, pin_memory=torch.cuda.is_available(),
        )

    def _setup_optimizer(self) -> None:
        cfg = self.config
        params = lora_parameters(self.unet, self.text_encoder if cfg.train_text_encoder else None)
        learning_rate = cfg.learning_rate
        if cfg.scale_lr:
            learning_rate *= cfg.gradient_accumulation_steps * cfg.train_batch_size * self.accelerator.num_processes
        optimizer_class = torch.optim.AdamW
        if cfg.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes, or pass --no-use_8bit_adam") from err
            optimizer_class = bnb.optim.AdamW8bit
        self.optimizer = optimizer_class(params, lr=learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                         weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        steps_per_epoch = math.ceil(math.ceil(len(self.train_dataloader) / self.accelerator.num_processes) / cfg.gradient_accumulation_steps)
        self.max_train_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps * self.accelerator.num_processes,
                                          num_training_steps=self.max_train_steps * self.accelerator.num_processes)

    def _setup_schedule(self) -> None:
        self.steps_per_epoch = math.ceil(len(self.train_dataloader) / self.config.gradient_accumulation_steps)
        self.num_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)

    def _setup_checkpointing(self) -> None:
        """Checkpoints hold only LoRA weights (not the frozen base), plus optimizer, scheduler, RNG and progress."""
        self.progress = TrainingProgress(self.generator)
        self.accelerator.register_for_checkpointing(self.progress)
        self.accelerator.register_save_state_pre_hook(self._save_model_hook)
        self.accelerator.register_load_state_pre_hook(self._load_model_hook)
        if self.config.resume_from_checkpoint:
            path = find_checkpoint(self.output_dir, self.config.resume_from_checkpoint)
            logger.info(f"Resuming from {path}")
            self.accelerator.load_state(str(path))
        if self.accelerator.is_main_process:
            self.accelerator.init_trackers("medfm-text-to-image-lora", config={k: str(v) for k, v in self.config.to_dict().items()})

    def _models_by_role(self, models):
        unet_class = type(self.accelerator.unwrap_model(self.unet))
        roles = {"unet": None, "text_encoder": None}
        for model in models:
            model = self.accelerator.unwrap_model(model)
            roles["unet" if isinstance(model, unet_class) else "text_encoder"] = model
        return roles

    def _save_model_hook(self, models, weights, output_dir):
        if self.accelerator.is_main_process:
            save_lora_adapter(output_dir, **self._models_by_role(models))
        weights.clear()  # the frozen base is not saved with every checkpoint

    def _load_model_hook(self, models, input_dir):
        load_lora_adapter(input_dir, **self._models_by_role(models))
        models.clear()

    # ------------------------------------------------------------------------------------------------ train
    def train(self) -> None:
        cfg, accelerator, progress = self.config, self.accelerator, self.progress
        trainable = [self.unet] + ([self.text_encoder] if cfg.train_text_encoder else [])
        logger.info(f"Training {sum(p.numel() for p in lora_parameters(*trainable)):,} LoRA parameters for {self.max_train_steps} steps "
                    f"({self.num_epochs} epochs of {self.steps_per_epoch}) at {self.resolution}px")
        bar = tqdm(total=self.max_train_steps, initial=progress.global_step, desc="Steps", disable=not accelerator.is_local_main_process)
        if progress.global_step == 0:
            self.validate()
        for epoch in range(progress.epoch, self.num_epochs):
            for model in trainable:
                model.train()
            self.train_dataloader.set_epoch(epoch)
            batches = self.train_dataloader
            if progress.batches_in_epoch:
                batches = accelerator.skip_first_batches(self.train_dataloader, progress.batches_in_epoch)
            for batch in batches:
                progress.batches_in_epoch += 1
                self._record_bad_rows(batch["bad_rows"])
                if "pixel_values" not in batch:
                    continue  # every row of this batch was unreadable
                with accelerator.accumulate(*trainable):
                    loss = self.training_step(batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(lora_parameters(*trainable), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                progress.global_step += 1
                bar.update(1)
                step_loss = accelerator.gather(loss.detach()).mean().item()
                bar.set_postfix(loss=f"{step_loss:.4f}")
                accelerator.log({"train_loss": step_loss, "lr": self.lr_scheduler.get_last_lr()[0]}, step=progress.global_step)
                if progress.global_step % cfg.checkpointing_steps == 0:
                    self.save_checkpoint()
                if cfg.validation_steps and progress.global_step % cfg.validation_steps == 0:
                    self.validate()
                if progress.global_step >= self.max_train_steps:
                    break
            else:
                progress.epoch, progress.batches_in_epoch = epoch + 1, 0
                if cfg.validation_epochs and progress.epoch % cfg.validation_epochs == 0:
                    self.validate()
                continue
            break
        bar.close()

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

    def _record_bad_rows(self, bad_rows: list[BadRow]) -> None:
        for row in bad_rows:
            self.quarantine.add(row.row_id, row.source, row.reason)

    # ------------------------------------------------------------------------------------------------ outputs
    def validate(self) -> Path | None:
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

    def save_checkpoint(self) -> None:
        if self.accelerator.is_main_process and self.config.checkpoints_total_limit:
            prune_checkpoints(self.output_dir, self.config.checkpoints_total_limit - 1)
        path = self.output_dir / f"checkpoint-{self.progress.global_step}"
        self.accelerator.save_state(str(path))
        logger.info(f"Saved checkpoint {path}")

    def save_adapter(self) -> Path:
        """The shareable folder: LoRA weights, model card, resolved config, validation grids, bad rows."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        bad_rows = gather_object(self.quarantine.rows)
        if accelerator.is_main_process:
            self.quarantine.rows = list({row.row_id: row for row in bad_rows}.values())
            unet = accelerator.unwrap_model(self.unet)
            text_encoder = accelerator.unwrap_model(self.text_encoder) if self.config.train_text_encoder else None
            save_lora_adapter(self.output_dir, unet, text_encoder)
            final_grid = self.validate()
            self.quarantine.write(self.output_dir / "bad_rows.jsonl")
            resolved = TrainConfig(**{**self.config.to_dict(), "pretrained_model_name_or_path": self.base, "resume_from_checkpoint": None})
            save_config(resolved, self.output_dir / "training_config.yaml")
            write_text_to_image_card(self.output_dir, resolved, self.base, num_pairs=len(self.dataset), num_bad=len(self.quarantine.rows),
                                     validation_image=final_grid.relative_to(self.output_dir).as_posix() if final_grid else None)
            print(f"Adapter saved to {self.output_dir.resolve()} ({len(self.quarantine.rows)} bad rows listed in bad_rows.jsonl)")
        return self.output_dir

    def cleanup(self) -> None:
        self.accelerator.end_training()
