"""LoRA-adapt a text-to-image base (any registered family: SD 1.x/2.x, SDXL, SD3/3.5, Flux.1, Sana, PixArt-Σ, ...) on
radiograph–report pairs (RoentGen's recipe, made cheap). The family entry says how to load, encode, noise and save;
this loop never asks which family it has."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.training_utils import cast_training_params
from diffusers.utils import make_image_grid
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data.cache import LATENT_PREPROCESSING_VERSION, CachedDataset, EncodingCache, content_bytes, default_cache_dir, digest, encoder_identity, fill_cache
from ..data.pairs import ImageReportDataset, collate_pairs, load_pairs
from ..hub import write_text_to_image_card
from ..lora import attach_lora
from ..models.diffusion import resolve_base
from ..models.families import detect_family
from ..models.families.base import tokenizer_identity
from ..models.quantize import pipeline_quantization
from .base import LoRARecipe

logger = get_logger(__name__)
LATENT_FIELDS = ("latent_mean", "latent_std", "pixel_values")
BATCH_FIELDS = ("index", "num_examples", *LATENT_FIELDS)


class TextToImageLoRARecipe(LoRARecipe):
    tracker_name = "medfm-text-to-image-lora"

    def _setup_models(self) -> None:
        cfg = self.config
        with self.accelerator.main_process_first():
            self.base = resolve_base(cfg.pretrained_model_name_or_path)
        self.family = detect_family(self.base, cfg.revision)
        if cfg.train_text_encoder and not self.family.text_encoder_lora:
            raise ValueError(f"--train_text_encoder is not supported for {self.family.display_name} bases; drop the flag")
        self.pipe = self.family.load_pipeline(self.base, cfg.revision, cfg.variant,
                                              **pipeline_quantization(self.family, cfg, self.accelerator.device, self.weight_dtype))
        self.vae, self.denoiser = self.pipe.vae, self.family.get_denoiser(self.pipe)
        self.text_encoders = self.family.get_text_encoders(self.pipe)
        self.resolution = cfg.resolution or self.family.native_resolution(self.pipe)
        self.objective = self.family.make_objective(self.pipe, cfg)
        logger.info(f"{self.base}: {self.family.display_name}, trained with {self.objective.description}")

        self.vae.requires_grad_(False)
        for encoder in self.text_encoders.values():
            encoder.requires_grad_(False)
        set_seed(cfg.seed)  # LoRA initialisation, the same whether or not loading a built-in base above built it (drawing)
        targets = cfg.lora_layers.split(",") if cfg.lora_layers else self.family.lora_targets(cfg.target_modules)
        attach_lora(self.denoiser, cfg.rank, cfg.lora_alpha, cfg.lora_dropout, targets)
        if cfg.train_text_encoder:
            for encoder in self.text_encoders.values():
                attach_lora(encoder, cfg.rank, cfg.lora_alpha, cfg.lora_dropout, cfg.text_encoder_target_modules)

        self.offloaded: list[torch.nn.Module] = []  # encoders moved off the accelerator once their outputs are cached
        device = self.accelerator.device
        for model in (self.vae, *self.text_encoders.values(), self.denoiser):
            if getattr(model, "is_quantized", False):
                continue  # bitsandbytes placed it on the accelerator in its storage dtype
            model.to(device, dtype=self.weight_dtype)  # also a base stored in fp16/bf16 (community SDXL, Sana's Gemma) when training in fp32
        cast_training_params([self.denoiser, *self.text_encoders.values()], dtype=torch.float32)  # LoRA weights train in fp32
        if cfg.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for encoder in self.text_encoders.values():
                    encoder.gradient_checkpointing_enable()

    def _setup_data(self) -> None:
        cfg = self.config
        with self.accelerator.main_process_first():
            pairs = load_pairs(cfg.train_data_dir, cfg.train_data_file, cfg.dataset_name, cfg.dataset_config_name,
                               cfg.image_column, cfg.caption_column, cfg.image_root, cfg.phantom_num_images)
        if cfg.max_train_samples:
            pairs = pairs[: cfg.max_train_samples]
        tokenizer, max_tokens = self.family.prompt_token_limit(self.pipe, cfg.max_sequence_length)
        self.dataset = ImageReportDataset(pairs, self.resolution, tokenizer, cfg.report_section, self.quarantine, cfg.verify_images, max_tokens)
        logger.info(f"{len(self.dataset)} usable pairs of {len(pairs)}; {len(self.quarantine.rows)} skipped; "
                    f"{self.dataset.num_truncated} reports cut at a sentence boundary to fit {max_tokens} tokens")
        workers = cfg.dataloader_num_workers
        self.train_dataloader = DataLoader(
            self._with_cached_encodings(self.dataset), batch_size=cfg.train_batch_size, shuffle=True, collate_fn=collate_pairs,
            num_workers=workers, pin_memory=self.accelerator.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
        )

    # ------------------------------------------------------------------------------------------------ caching
    def _with_cached_encodings(self, dataset: ImageReportDataset) -> Dataset:
        """The dataset with frozen encoders' outputs read from the on-disk cache (filled here when missing), looked up by
        example index: whatever order the loader draws, each example gets its own latent and its own caption's embeddings."""
        cfg = self.config
        cache_latents = cfg.cache_latents is not False
        cache_text = not cfg.train_text_encoder if cfg.cache_text_embeddings is None else cfg.cache_text_embeddings
        root = cfg.cache_dir or default_cache_dir()
        latents = self._cache_latents(dataset, root) if cache_latents else None
        text = self._cache_text_embeddings(dataset, root) if cache_text else None
        if latents or text:
            logger.info(f"Cached encodings in {root}: latents {'on' if latents else 'off'}, text embeddings {'on' if text else 'off'}")
        self._offload(self.vae if latents else None, *(self.text_encoders.values() if text else ()))
        return CachedDataset(dataset, latents, text)

    def _cache_latents(self, dataset: ImageReportDataset, root) -> tuple[EncodingCache, list[str]]:
        """VAE latents (distributions where the VAE has one: each step still draws its own sample, as without the cache)."""
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
            encoded = iter(self.family.encode_images(self.vae, torch.stack(good).to(self.accelerator.device, dtype=self.weight_dtype)))
            return [next(encoded) if "pixel_values" in e else None for e in examples]

        fill_cache(cache, keys, encode, self.config.train_batch_size, self.accelerator, "Caching latents")
        return cache, keys

    def _cache_text_embeddings(self, dataset: ImageReportDataset, root) -> tuple[EncodingCache, list[str]]:
        """Every text encoder's outputs (embeddings, pooled embeddings, masks), keyed by the prompt text, the family's prompt
        settings (sequence length, instruction) and the identity of every tokenizer and encoder."""
        family, cfg = self.family, self.config
        tokenizers = [c for name, c in sorted(self.pipe.components.items()) if name.startswith("tokenizer") and c is not None]
        identity = digest(family.name, *(encoder_identity(e) for e in self.text_encoders.values()), *map(tokenizer_identity, tokenizers))
        cache = EncodingCache(root, "text-embeddings", identity, family.prompt_settings(self.pipe, cfg.max_sequence_length))
        texts = [dataset.text(i) for i in range(len(dataset))]
        keys = [cache.key(text.encode()) for text in texts]

        @torch.no_grad()
        def encode(indices):
            encoded = family.encode_prompts(self.pipe, [texts[i] for i in indices], cfg.max_sequence_length)
            return [{name: tensor[row] for name, tensor in encoded.items()} for row in range(len(indices))]

        fill_cache(cache, keys, encode, self.config.train_batch_size, self.accelerator, "Caching text embeddings")
        return cache, keys

    def _offload(self, *encoders) -> None:
        """Encoders whose outputs are cached (VAE, T5/Gemma/CLIP) leave the accelerator until validation needs them."""
        self.offloaded = [e for e in encoders if e is not None and not getattr(e, "is_quantized", False)]
        for encoder in self.offloaded:
            encoder.to("cpu")

    def trainable_models(self) -> list[torch.nn.Module]:
        return [self.denoiser, *self.text_encoders.values()] if self.config.train_text_encoder else [self.denoiser]

    def _set_prepared_models(self, models: list[torch.nn.Module]) -> None:
        self.denoiser, *rest = models  # prepared (possibly wrapped); self.pipe keeps the unwrapped ones
        self.text_encoders.update(zip(self.text_encoders, rest))

    def _models_by_role(self, models) -> tuple[torch.nn.Module, dict]:
        """(denoiser, {text encoder name: model}) among the unwrapped models accelerate hands to checkpoint hooks."""
        denoiser = self.family.get_denoiser(self.pipe)
        encoders = {name: m for m in models for name, e in self.family.get_text_encoders(self.pipe).items() if m is e}
        return next(m for m in models if m is denoiser), encoders

    def save_lora(self, models, directory) -> None:
        denoiser, encoders = self._models_by_role(models)
        self.family.save_lora(directory, denoiser, encoders)

    def load_lora(self, models, directory) -> None:
        denoiser, encoders = self._models_by_role(models)
        self.family.load_lora(directory, denoiser, encoders)

    # ------------------------------------------------------------------------------------------------ train
    def training_step(self, batch: dict) -> torch.Tensor:
        """The family's loss on one batch (DDPM epsilon/v with optional min-SNR weighting, or rectified flow)."""
        device, dtype = self.accelerator.device, self.weight_dtype
        generator = self.sample_generators(batch["index"])
        if "latent_mean" not in batch:
            with torch.no_grad():
                encoded = self.family.encode_images(self.vae, batch["pixel_values"].to(device, dtype=dtype))
            batch.update({name: torch.stack([e[name] for e in encoded]) for name in encoded[0]})
        latents = batch["latent_mean"].to(device, dtype=dtype)
        if "latent_std" in batch:  # the same draw as DiagonalGaussianDistribution.sample
            latents = latents + batch["latent_std"].to(device, dtype=dtype) * randn_tensor(latents.shape, generator=generator, device=device, dtype=dtype)
        latents = self.family.to_model_space(self.vae, latents)
        noised = self.objective.noise(latents, generator)
        conditioning = {name: value for name, value in batch.items() if name not in BATCH_FIELDS}
        if conditioning:  # cached
            conditioning = {name: value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device) for name, value in conditioning.items()}
        else:
            texts = [self.dataset.text(int(i)) for i in batch["index"]]
            with torch.set_grad_enabled(self.config.train_text_encoder):
                conditioning = self.family.encode_prompts(self.pipe, texts, self.config.max_sequence_length)
        prediction = self.family.predict(self.pipe, self.denoiser, noised.latents, noised.timesteps, conditioning, self.config)
        return self.objective.loss(prediction, noised)

    # ------------------------------------------------------------------------------------------------ outputs
    def _run_validation(self) -> Path | None:
        """Render every validation prompt at a fixed seed; save the grid and log it to TensorBoard."""
        cfg, accelerator = self.config, self.accelerator
        if not cfg.validation_prompt or not accelerator.is_main_process:
            return None
        denoiser = self.family.get_denoiser(self.pipe)  # the training modules themselves, unwrapped
        for encoder in self.offloaded:
            encoder.to(accelerator.device)
        self.pipe.set_progress_bar_config(disable=True)
        denoiser.eval()
        with torch.no_grad(), accelerator.autocast():
            images = self.pipe(cfg.validation_prompt, num_images_per_prompt=cfg.num_validation_images, height=self.resolution, width=self.resolution,
                               num_inference_steps=cfg.validation_inference_steps, guidance_scale=cfg.validation_guidance_scale,
                               generator=torch.Generator().manual_seed(cfg.seed), **self.family.pipeline_kwargs(cfg.max_sequence_length)).images
        denoiser.train()
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
        encoders = self.family.get_text_encoders(self.pipe) if self.config.train_text_encoder else None
        self.family.save_lora(self.output_dir, self.family.get_denoiser(self.pipe), encoders)

    def _write_model_card(self, resolved: TrainConfig, validation: Path | None) -> None:
        write_text_to_image_card(self.output_dir, resolved, num_pairs=len(self.dataset), num_bad=len(self.quarantine.rows),
                                 validation_image=validation.relative_to(self.output_dir).as_posix() if validation else None,
                                 objective=self.objective.description)
