"""Training objectives shared by the diffusion families: DDPM noise/velocity prediction and rectified flow.

Each objective noises a batch of latents with per-example generators (so every draw is the same however the batch is
split over processes and after a resume) and turns the denoiser's prediction into a loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr
from diffusers.utils.torch_utils import randn_tensor

WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


@dataclass
class Noised:
    """A noised batch: what the denoiser sees (latents, timesteps) and what it should predict."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None = None  # per-example loss weights (None: uniform)


def _per_example_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=list(range(1, prediction.ndim)))


class DDPMObjective:
    """Noise (epsilon) or velocity (v) prediction on the DDPM schedule, with optional min-SNR weighting and noise offset."""

    name = "DDPM"

    def __init__(self, scheduler: DDPMScheduler, snr_gamma: float | None = None, noise_offset: float = 0.0):
        self.scheduler, self.snr_gamma, self.noise_offset = scheduler, snr_gamma, noise_offset
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"Unsupported prediction type {self.prediction_type!r}; use epsilon or v_prediction")

    @property
    def description(self) -> str:
        return f"DDPM {'noise (epsilon)' if self.prediction_type == 'epsilon' else 'velocity (v)'} prediction"

    def noise(self, latents: torch.Tensor, generators: list[torch.Generator]) -> Noised:
        device, dtype = latents.device, latents.dtype
        noise = randn_tensor(latents.shape, generator=generators, device=device, dtype=dtype)
        if self.noise_offset:
            noise += self.noise_offset * randn_tensor((*latents.shape[:2], 1, 1), generator=generators, device=device, dtype=dtype)
        num_timesteps = self.scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, num_timesteps, (1,), generator=g) for g in generators]).to(device)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        return Noised(self.scheduler.add_noise(latents, noise, timesteps), timesteps, target)

    def loss(self, prediction: torch.Tensor, noised: Noised) -> torch.Tensor:
        if self.snr_gamma is None:
            return F.mse_loss(prediction.float(), noised.target.float(), reduction="mean")
        return self.per_example_loss(prediction, noised).mean()

    def per_example_loss(self, prediction: torch.Tensor, noised: Noised) -> torch.Tensor:
        """Each example's (min-SNR weighted) error: what Diffusion-DPO compares between the preferred and the other image."""
        if self.snr_gamma is None:
            return _per_example_loss(prediction, noised.target)
        snr = compute_snr(self.scheduler, noised.timesteps)
        weights = torch.stack([snr, self.snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        weights = weights / snr if self.prediction_type == "epsilon" else weights / (snr + 1)
        return _per_example_loss(prediction, noised.target) * weights


class FlowMatchingObjective:
    """Rectified flow (SD3, Flux.1, Sana): x_t = (1 - sigma) x_0 + sigma noise, the denoiser predicts the velocity noise - x_0.

    Timesteps are drawn as diffusers' DreamBooth scripts draw them (`--weighting_scheme`, `--logit_mean`, `--logit_std`,
    `--mode_scale`), on the sigmas of a FlowMatchEulerDiscreteScheduler made from the base's scheduler config (its shift kept).
    """

    name = "rectified flow"
    description = "rectified flow (velocity noise - x0)"

    def __init__(self, scheduler_config: dict, weighting_scheme: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29):
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.weighting_scheme, self.logit_mean, self.logit_std, self.mode_scale = weighting_scheme, logit_mean, logit_std, mode_scale

    @staticmethod
    def target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def noise(self, latents: torch.Tensor, generators: list[torch.Generator]) -> Noised:
        device, dtype = latents.device, latents.dtype
        noise = randn_tensor(latents.shape, generator=generators, device=device, dtype=dtype)
        u = torch.cat([compute_density_for_timestep_sampling(self.weighting_scheme, 1, self.logit_mean, self.logit_std, self.mode_scale, generator=g)
                       for g in generators])
        indices = (u * self.scheduler.config.num_train_timesteps).long().clamp(max=len(self.scheduler.timesteps) - 1)
        timesteps = self.scheduler.timesteps[indices].to(device)
        sigmas = self.scheduler.sigmas[indices].to(device, dtype=dtype).view(-1, *[1] * (latents.ndim - 1))
        weights = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas).flatten().float()
        return Noised((1.0 - sigmas) * latents + sigmas * noise, timesteps, self.target(latents, noise), weights)

    def loss(self, prediction: torch.Tensor, noised: Noised) -> torch.Tensor:
        return self.per_example_loss(prediction, noised).mean()

    def per_example_loss(self, prediction: torch.Tensor, noised: Noised) -> torch.Tensor:
        """Each example's (weighted) error: what Diffusion-DPO compares between the preferred and the other image."""
        weights = noised.weights
        per_example = (weights.view(-1, *[1] * (prediction.ndim - 1)) * (prediction.float() - noised.target.float()) ** 2)
        return per_example.reshape(prediction.shape[0], -1).mean(dim=1)
