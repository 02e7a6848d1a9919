"""Diffusion-DPO (Wallace et al. 2023): a text-to-image LoRA trained on readers' preferences between two radiographs of one prompt.

Both images of a pair are noised with the same noise at the same timestep; the loss rewards the LoRA for lowering its
denoising error on the preferred image more than the reference does, relative to the other image:
    loss = -log sigmoid(-beta/2 * ((err_w - ref_err_w) - (err_l - ref_err_l)))
with err the family objective's per-example error (epsilon, v or rectified-flow velocity). The reference is the same
denoiser with its LoRA switched off (the base), or with --init_adapter the starting adapter (a frozen copy of its LoRA
weights only, swapped in for the reference pass: no second copy of the base).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download
from torch.utils.data import DataLoader

from ..config import TrainConfig, load_config
from ..data.image_preferences import ImagePreferenceDataset
from ..data.pairs import collate_pairs
from ..hub import write_text_to_image_card
from ..lora import attach_lora, lora_disabled, lora_weights_swapped
from ..models.families.objectives import Noised
from .text_to_image import TextToImageLoRARecipe

logger = get_logger(__name__)
LORA_KEYS = ("rank", "lora_alpha", "lora_dropout", "target_modules", "lora_layers")  # taken from --init_adapter's training config


def resolve_adapter(name_or_path: str) -> Path:
    """An adapter folder, or a Hub adapter repo downloaded to the local cache."""
    return Path(name_or_path) if Path(name_or_path).is_dir() else Path(snapshot_download(name_or_path))


def paired_noise(objective, chosen: torch.Tensor, rejected: torch.Tensor, generators: list[torch.Generator]) -> Noised:
    """Both halves of a pair noised with the same noise at the same timestep (each rejected image draws from a twin of its
    chosen image's generator), stacked chosen first."""
    twins = [torch.Generator(g.device) for g in generators]
    for twin, generator in zip(twins, generators):
        twin.set_state(generator.get_state())
    return objective.noise(torch.cat([chosen, rejected]), [*generators, *twins])


def diffusion_dpo_loss(error: torch.Tensor, reference_error: torch.Tensor, beta: float) -> torch.Tensor:
    """Diffusion-DPO's loss from per-example denoising errors of the trained and the reference model, chosen half first."""
    error_w, error_l = error.chunk(2)
    reference_w, reference_l = reference_error.chunk(2)
    return -F.logsigmoid(-0.5 * beta * ((error_w - reference_w) - (error_l - reference_l))).mean()


class TextToImageDPORecipe(TextToImageLoRARecipe):
    tracker_name = "medfm-text-to-image-dpo"

    def _setup_models(self) -> None:
        cfg = self.config
        self.init_adapter = resolve_adapter(cfg.init_adapter) if cfg.init_adapter else None
        init_config = self._init_adapter_config() if self.init_adapter else None
        if init_config:
            for key in LORA_KEYS:  # the LoRA is the starting adapter's
                setattr(cfg, key, getattr(init_config, key))
        super()._setup_models()
        self.frozen_encoders: dict = {}  # text encoders carrying the starting adapter's (frozen) LoRA
        self.reference_lora: dict[str, torch.Tensor] | None = None
        if init_config:
            if init_config.train_text_encoder:
                for encoder in self.text_encoders.values():
                    attach_lora(encoder, init_config.rank, init_config.lora_alpha, init_config.lora_dropout, init_config.text_encoder_target_modules)
                    encoder.requires_grad_(False)
                self.frozen_encoders = dict(self.text_encoders)
            self.family.load_lora(self.init_adapter, self.denoiser, self.frozen_encoders)
            self.reference_lora = {name: p.detach().clone() for name, p in self.denoiser.named_parameters() if p.requires_grad}
        logger.info(f"Diffusion-DPO, beta {cfg.beta_dpo}; reference: {self.reference_description}")

    def _init_adapter_config(self) -> TrainConfig:
        path = self.init_adapter / "training_config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"--init_adapter {self.config.init_adapter}: no training_config.yaml; pass a folder a medfm text-to-image run wrote")
        init_config = load_config(path)
        if init_config.task != "text-to-image":
            raise ValueError(f"--init_adapter {self.config.init_adapter}: a {init_config.task} adapter; text-to-image DPO starts from a text-to-image one")
        return init_config

    @property
    def reference_description(self) -> str:
        return f"the starting adapter {self.config.init_adapter}" if self.init_adapter else "the base (LoRA switched off)"

    def _setup_data(self) -> None:
        cfg = self.config
        tokenizer, max_tokens = self.family.prompt_token_limit(self.pipe, cfg.max_sequence_length)
        self.dataset = ImagePreferenceDataset(cfg.train_data_file, self.resolution, tokenizer, max_tokens, self.quarantine, cfg.image_root, cfg.verify_images)
        logger.info(f"{len(self.dataset)} usable preference pairs; {len(self.quarantine.rows)} skipped; "
                    f"{self.dataset.num_truncated} prompts cut at a sentence boundary to fit {max_tokens} tokens")
        workers = cfg.dataloader_num_workers
        self.train_dataloader = DataLoader(self.dataset, batch_size=cfg.train_batch_size, shuffle=True, collate_fn=collate_pairs, num_workers=workers,
                                           pin_memory=self.accelerator.device.type == "cuda", persistent_workers=workers > 0)

    @contextmanager
    def _reference(self):
        """The unwrapped denoiser acting as the reference inside this block."""
        denoiser = self.family.get_denoiser(self.pipe)
        if self.reference_lora is None:
            with lora_disabled(denoiser):
                yield denoiser
        else:
            with lora_weights_swapped(denoiser, self.reference_lora):
                yield denoiser

    def training_step(self, batch: dict) -> torch.Tensor:
        cfg, device, dtype = self.config, self.accelerator.device, self.weight_dtype
        generators = self.sample_generators(batch["index"])
        pixels = torch.cat([batch["pixel_values"], batch["rejected_pixel_values"]]).to(device, dtype=dtype)
        with torch.no_grad():
            encoded = self.family.encode_images(self.vae, pixels)
            latents = torch.stack([e["latent_mean"] for e in encoded])
            if "latent_std" in encoded[0]:  # each image's own draw from its latent distribution
                std = torch.stack([e["latent_std"] for e in encoded])
                latents = latents + std * randn_tensor(latents.shape, generator=[*generators, *generators], device=device, dtype=dtype)
            latents = self.family.to_model_space(self.vae, latents)
            chosen, rejected = latents.chunk(2)
            noised = paired_noise(self.objective, chosen, rejected, generators)
            texts = [self.dataset.text(int(i)) for i in batch["index"]]
            conditioning = {name: torch.cat([value, value]) for name, value in self.family.encode_prompts(self.pipe, texts, cfg.max_sequence_length).items()}
            with self._reference() as reference:
                reference_prediction = self.family.predict(self.pipe, reference, noised.latents, noised.timesteps, conditioning, cfg)
            reference_error = self.objective.per_example_loss(reference_prediction, noised)
        prediction = self.family.predict(self.pipe, self.denoiser, noised.latents, noised.timesteps, conditioning, cfg)
        return diffusion_dpo_loss(self.objective.per_example_loss(prediction, noised), reference_error, cfg.beta_dpo)

    def _save_adapter_weights(self) -> None:
        self.family.save_lora(self.output_dir, self.family.get_denoiser(self.pipe), self.frozen_encoders or None)

    def _write_model_card(self, resolved: TrainConfig, validation: Path | None) -> None:
        objective = (f"Diffusion-DPO (Wallace et al. 2023) on {len(self.dataset)} preference pairs (a prompt, the preferred and the other radiograph), "
                     f"beta_dpo {self.config.beta_dpo}, denoising error: {self.objective.description}; reference and starting point: "
                     f"{self.reference_description}")
        write_text_to_image_card(self.output_dir, resolved, num_pairs=len(self.dataset), num_bad=len(self.quarantine.rows),
                                 validation_image=validation.relative_to(self.output_dir).as_posix() if validation else None, objective=objective)
