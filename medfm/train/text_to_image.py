"""LoRA-adapt a Stable Diffusion-family model on radiograph–report pairs (RoentGen's recipe, made cheap)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.training_utils import cast_training_params, compute_snr
from diffusers.utils import make_image_grid
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data.cache import LATENT_PREPROCESSING_VERSION, CachedDataset, EncodingCache, content_bytes, default_cache_dir, encoder_identity, fill_cache
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
        set_seed(cfg.seed)  # LoRA initialisation, the same whether or not loading a built-in base above built it (drawing)
        attach_lora(self.unet, cfg.rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
        if cfg.train_text_encoder:
            attach_lora(self.text_encoder, cfg.rank, cfg.lora_alpha, cfg.lora_dropout, cfg.text_encoder_target_modules)

        self.offloaded: list[torch.nn.Module] = []  # encoders moved off the accelerator once their outputs are cached
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
        workers = cfg.dataloader_num_workers
        self.train_dataloader = DataLoader(
            self._with_cached_encodings(self.dataset), batch_size=cfg.train_batch_size, shuffle=True, collate_fn=collate_pairs,
            num_workers=workers, pin_memory=self.accelerator.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
        )

    # ------------------------------------------------------------------------------------------------ caching
    def _with_cached_encodings(self, dataset: ImageReportDataset) -> Dataset:
        """The dataset with frozen encoders' outputs read from the on-disk cache (filled here when missing)."""
        cfg = self.config
        cache_latents = cfg.cache_latents is not False
        cache_text = not cfg.train_text_encoder if cfg.cache_text_embeddings is None else cfg.cache_text_embeddings
        if not (cache_latents or cache_text):
            return dataset
        root = cfg.cache_dir or default_cache_dir()
        latents = self._cache_latents(dataset, root) if cache_latents else None
        text = self._cache_text_embeddings(dataset, root) if cache_text else None
        logger.info(f"Cached encodings in {root}: latents {'on' if latents else 'off'}, text embeddings {'on' if text else 'off'}")
        self._offload(self.vae if latents else None, self.text_encoder if text else None)
        return CachedDataset(dataset, latents, text)

    def _cache_latents(self, dataset: ImageReportDataset, root) -> tuple[EncodingCache, list[str]]:
        """VAE latent distributions (mean, std), not samples: each step still draws its own sample, as without the cache."""
        settings = {"resolution": self.resolution, "crop": "center", "preprocessing": LATENT_PREPROCESSING_VERSION}
        cache = EncodingCache(root, "vae-latents", encoder_identity(self.vae), settings)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # file reads release the GIL
            contents = pool.map(lambda i: content_bytes(dataset.image(i)), range(len(dataset)))
            keys = [cache.key(c) for c in tqdm(contents, total=len(dataset), desc="Hashing images", unit="image",
                                               disable=not self.accelerator.is_local_main_process)]

        @torch.no_grad()
        def encode(indices):
            examples = [dataset.item(i, input_ids=False) for i in indices]
            good = [e["pixel_values"] for e in examples if "pixel_values" in e]
            if not good:
                return [None] * len(examples)
            dist = self.vae.encode(torch.stack(good).to(self.accelerator.device, dtype=self.weight_dtype)).latent_dist
            encoded = iter({"latent_mean": mean, "latent_std": std} for mean, std in zip(dist.mean, dist.std))
            return [next(encoded) if "pixel_values" in e else None for e in examples]

        fill_cache(cache, keys, encode, self.config.train_batch_size, self.accelerator, "Caching latents")
        return cache, keys

    def _cache_text_embeddings(self, dataset: ImageReportDataset, root) -> tuple[EncodingCache, list[str]]:
        """Text-encoder outputs, keyed by the token ids (so the report section and truncation are part of the key)."""
        cache = EncodingCache(root, "text-embeddings", encoder_identity(self.text_encoder), {"output": "last_hidden_state"})
        input_ids = [dataset.tokenize(dataset.text(i)) for i in range(len(dataset))]
        keys = [cache.key(ids.numpy().tobytes()) for ids in input_ids]

        @torch.no_grad()
        def encode(indices):
            hidden = self.text_encoder(torch.stack([input_ids[i] for i in indices]).to(self.accelerator.device), return_dict=False)[0]
            return [{"encoder_hidden_states": h} for h in hidden]

        fill_cache(cache, keys, encode, self.config.train_batch_size, self.accelerator, "Caching text embeddings")
        return cache, keys

    def _offload(self, *encoders) -> None:
        """Encoders whose outputs are cached leave the accelerator until validation needs them."""
        self.offloaded = [e for e in encoders if e is not None]
        for encoder in self.offloaded:
            encoder.to("cpu")

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
        cfg, device, dtype = self.config, self.accelerator.device, self.weight_dtype
        generator = self.sample_generators(batch["index"])
        if "latent_mean" in batch:  # cached: the same draw as DiagonalGaussianDistribution.sample
            mean = batch["latent_mean"].to(device, dtype=dtype)
            latents = mean + batch["latent_std"].to(device, dtype=dtype) * randn_tensor(mean.shape, generator=generator, device=device, dtype=dtype)
        else:
            with torch.no_grad():
                latents = self.vae.encode(batch["pixel_values"].to(device, dtype=dtype)).latent_dist.sample(generator=generator)
        latents = latents * self.vae.config.scaling_factor
        noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=dtype)
        if cfg.noise_offset:
            noise += cfg.noise_offset * randn_tensor((*latents.shape[:2], 1, 1), generator=generator, device=device, dtype=dtype)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, num_timesteps, (1,), generator=g) for g in generator]).to(device)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if "encoder_hidden_states" in batch:
            encoder_hidden_states = batch["encoder_hidden_states"].to(device, dtype=dtype)
        else:
            encoder_hidden_states = self.text_encoder(batch["input_ids"].to(device), return_dict=False)[0]

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
        for encoder in self.offloaded:
            encoder.to(accelerator.device)
        pipe = load_pipeline(self.base, cfg.revision, cfg.variant, unet=unet, text_encoder=text_encoder, vae=self.vae, tokenizer=self.tokenizer)
        pipe.set_progress_bar_config(disable=True)
        unet.eval()
        with torch.no_grad(), accelerator.autocast():
            images = pipe(cfg.validation_prompt, num_images_per_prompt=cfg.num_validation_images, height=self.resolution, width=self.resolution,
                          num_inference_steps=cfg.validation_inference_steps, guidance_scale=cfg.validation_guidance_scale,
                          generator=torch.Generator().manual_seed(cfg.seed)).images
        unet.train()
        for encoder in self.offloaded:
            encoder.to("cpu")
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
        write_text_to_image_card(self.output_dir, resolved, num_pairs=len(self.dataset), num_bad=len(self.quarantine.rows),
                                 validation_image=validation.relative_to(self.output_dir).as_posix() if validation else None)
