"""What a text-to-image family is: how its pipeline is loaded, prompts encoded, latents noised and LoRA saved.

The training recipe, `medfm generate`, merge, export and the demo call a family's methods and never ask which family
they hold; a new base is one subclass registered in `registry.py` (as transformers' Auto classes map a config to a
model class, model_index.json's pipeline `_class_name` maps to a family here).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.training_utils import _set_state_dict_into_text_encoder
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from ...paths import with_default_mode
from .objectives import DDPMObjective, FlowMatchingObjective

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
ATTENTION_PROJECTIONS = ["to_k", "to_q", "to_v", "to_out.0"]


class DiffusionFamily:
    """One pipeline family. Subclasses set the class attributes and override what differs from these defaults
    (a transformer denoiser, one text encoder, a KL VAE, a pipeline-level LoRA loader)."""

    name: str
    display_name: str
    pipeline_class: type[DiffusionPipeline]
    pipeline_class_names: tuple[str, ...]  # model_index.json `_class_name`s this family loads
    denoiser: str = "transformer"
    text_encoders: tuple[str, ...] = ("text_encoder",)
    large_text_encoders: tuple[str, ...] = ()  # T5/Gemma encoders that --quantize_base quantises with the denoiser
    prompt_tokenizer: str = "tokenizer"  # the tokenizer whose length limit a report is cut to (at a sentence boundary)
    objective: str = "flow"  # "flow" (rectified flow) or "ddpm"
    text_encoder_lora: bool = False  # whether --train_text_encoder is supported
    lora_loader: str = "diffusers"  # "diffusers": pipe.load_lora_weights(folder); "peft": PeftModel.from_pretrained(pipe.transformer, folder)
    kohya_prefixes: dict[str, str] | None = None  # component -> kohya-ss key prefix, where that format exists for the family
    kohya_layout: tuple | None = None  # (diffusers module regex, kohya module, fused parts) where kohya names differ from diffusers paths (Flux)
    recipe: str | None = None  # recipes/configs file for this family
    objective_summary: str = "rectified flow (velocity noise - x0)"  # for model cards

    # ------------------------------------------------------------------------------------------------ loading
    def load_pipeline(self, path: str, revision: str | None = None, variant: str | None = None, **components) -> DiffusionPipeline:
        return self.pipeline_class.from_pretrained(path, revision=revision, variant=variant, **components)

    def get_denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser)

    def get_text_encoders(self, pipe) -> dict[str, torch.nn.Module]:
        return {name: getattr(pipe, name) for name in self.text_encoders if getattr(pipe, name, None) is not None}

    def native_resolution(self, pipe) -> int:
        return self.get_denoiser(pipe).config.sample_size * pipe.vae_scale_factor

    def latent_size(self, pipe, resolution: int) -> int:
        return resolution // pipe.vae_scale_factor

    def initial_noise(self, pipe, num_images: int, seed: int, resolution: int) -> torch.Tensor:
        """The latents `pipe(prompt, num_images_per_prompt=num_images, height=resolution, width=resolution,
        generator=torch.Generator().manual_seed(seed))` starts from, in the layout its `latents=` argument takes."""
        denoiser, size = self.get_denoiser(pipe), self.latent_size(pipe, resolution)
        shape = (num_images, denoiser.config.in_channels, size, size)
        return randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=denoiser.dtype)

    # ------------------------------------------------------------------------------------------------ prompts
    def prompt_token_limit(self, pipe, max_sequence_length: int | None) -> tuple[object, int]:
        """(tokenizer, tokens a report may have before special tokens) for cutting reports to what the encoder sees."""
        tokenizer = getattr(pipe, self.prompt_tokenizer)
        length = max_sequence_length or self.default_max_sequence_length(pipe)
        return tokenizer, length - tokenizer.num_special_tokens_to_add()

    def default_max_sequence_length(self, pipe) -> int:
        """The pipeline call's own default where it has one (T5/Gemma families), else the prompt tokenizer's limit (CLIP)."""
        if "max_sequence_length" in inspect.signature(self.pipeline_class.__call__).parameters:
            return call_default(self.pipeline_class, "max_sequence_length")
        return getattr(pipe, self.prompt_tokenizer).model_max_length

    def encode_prompts(self, pipe, texts: list[str], max_sequence_length: int | None) -> dict[str, torch.Tensor]:
        """Everything the denoiser reads from the prompts, batch first (embeddings, pooled embeddings, masks): cacheable per example."""
        raise NotImplementedError

    def prompt_settings(self, pipe, max_sequence_length: int | None) -> dict:
        """Settings that change encode_prompts' output besides the text and the encoders (part of the cache key): the prompt
        length it encodes to, and whatever else the family's encoding prepends or switches (instructions, system prompts)."""
        return {"max_sequence_length": max_sequence_length or self.default_max_sequence_length(pipe)}

    def pipeline_kwargs(self, max_sequence_length: int | None) -> dict:
        """Arguments a pipeline call needs to see prompts as training encoded them."""
        return {"max_sequence_length": max_sequence_length} if max_sequence_length else {}

    # ------------------------------------------------------------------------------------------------ latents
    def encode_images(self, vae, pixels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per image, the VAE's latent distribution (mean, std): each step still draws its own sample, as without a cache."""
        dist = vae.encode(pixels).latent_dist
        return [{"latent_mean": mean, "latent_std": std} for mean, std in zip(dist.mean, dist.std)]

    def to_model_space(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents as the denoiser sees them (the pipeline undoes this before decoding)."""
        shift = getattr(vae.config, "shift_factor", None)
        return (latents - shift if shift else latents) * vae.config.scaling_factor

    # ------------------------------------------------------------------------------------------------ objective
    def make_objective(self, pipe, cfg):
        if self.objective == "ddpm":
            scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            if cfg.prediction_type:
                scheduler.register_to_config(prediction_type=cfg.prediction_type)
            return DDPMObjective(scheduler, cfg.snr_gamma, cfg.noise_offset)
        return FlowMatchingObjective(pipe.scheduler.config, cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale)

    def predict(self, pipe, denoiser, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, torch.Tensor], cfg) -> torch.Tensor:
        """The denoiser's prediction for noised latents, in the latents' layout (`denoiser`: the trained, possibly wrapped, module;
        `pipe`: the rest of the base)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ LoRA
    def lora_targets(self, target_modules: list[str]) -> list[str]:
        """Modules that get LoRA when --lora_layers is not given: the configured attention projections."""
        return list(target_modules)

    def adapter_config(self, denoiser) -> LoraConfig:
        return denoiser.peft_config["default"]

    def save_lora(self, directory: str | Path, denoiser, text_encoders: dict | None = None) -> None:
        """Write the adapter so the family's own pipeline loads it (`pipe.load_lora_weights(directory)`), LoRA alpha in the metadata."""
        # UNet LoRA in diffusers' own key names (as its SD scripts save); a transformer's stays in PEFT names: the DiT loaders convert
        # a file only when its first key is not a PEFT one, so a mix (to_q renamed, add_q_proj not) silently lost modules.
        denoiser_layers = get_peft_model_state_dict(denoiser)
        kwargs = {f"{self.denoiser}_lora_layers": convert_state_dict_to_diffusers(denoiser_layers) if self.denoiser == "unet" else denoiser_layers,
                  f"{self.denoiser}_lora_adapter_metadata": self.adapter_config(denoiser).to_dict()}
        for name, encoder in (text_encoders or {}).items():
            kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
            kwargs[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
        self.pipeline_class.save_lora_weights(directory, weight_name=LORA_WEIGHTS_NAME, **kwargs)
        with_default_mode(Path(directory) / LORA_WEIGHTS_NAME)

    def lora_state_dict(self, directory: str | Path) -> dict[str, torch.Tensor]:
        """The adapter's weights as diffusers reads them, keys prefixed by component (`transformer.`, `text_encoder.`)."""
        state_dict = self.pipeline_class.lora_state_dict(str(directory), weight_name=LORA_WEIGHTS_NAME)
        return state_dict[0] if isinstance(state_dict, tuple) else state_dict

    def load_lora(self, directory: str | Path, denoiser, text_encoders: dict | None = None) -> None:
        """Load weights written by save_lora into training models that already carry a LoRA adapter (resume)."""
        state_dict = self.lora_state_dict(directory)
        prefix = f"{self.denoiser}."
        own = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
        incompatible = set_peft_model_state_dict(denoiser, convert_unet_state_dict_to_peft(own), adapter_name="default")
        if incompatible is not None and getattr(incompatible, "unexpected_keys", None):
            raise ValueError(f"{directory}: LoRA keys that do not fit the {self.denoiser}: {incompatible.unexpected_keys[:5]}")
        for name, encoder in (text_encoders or {}).items():
            _set_state_dict_into_text_encoder(state_dict, prefix=f"{name}.", text_encoder=encoder)

    def load_adapter_into(self, pipe, folder: str | Path) -> None:
        """Load an adapter folder into a pipeline the way a user without medfm would."""
        pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS_NAME)

    @contextmanager
    def adapter_disabled(self, pipe):
        """The pipeline renders as the base alone inside this block (its LoRA layers switched off, no second copy loaded)."""
        pipe.disable_lora()
        try:
            yield pipe
        finally:
            pipe.enable_lora()

    def card_call_arguments(self, resolution: int | None, max_sequence_length: int | None) -> str:
        """Extra arguments of the model card's `pipe(prompt, ...)` call that render as training saw prompts and images."""
        kwargs = {**({"height": resolution, "width": resolution} if resolution else {}), **self.pipeline_kwargs(max_sequence_length)}
        return "".join(f", {key}={value!r}" for key, value in kwargs.items())

    def fuse_adapter(self, pipe) -> None:
        """Fold the loaded LoRA into the base weights (for `medfm merge`)."""
        pipe.fuse_lora(components=[self.denoiser, *self.text_encoders])
        pipe.unload_lora_weights()

    loading_extra: str = ""  # extra from_pretrained arguments in the loading snippet

    def loading_snippet(self, base_expression: str, adapter_expression: str) -> str:
        """Python lines that load the base and the adapter with plain diffusers, no medfm (for the model card and errors)."""
        name = self.pipeline_class.__name__
        return (f"from diffusers import {name}\n\npipe = {name}.from_pretrained({base_expression}{self.loading_extra})\n"
                f"pipe.load_lora_weights({adapter_expression})")

    # ------------------------------------------------------------------------------------------------ tiny base
    def build_tiny(self, seed: int = 0) -> DiffusionPipeline:
        """A tiny pipeline of this family built from configs, offline (for tests)."""
        raise NotImplementedError


def tokenizer_identity(tokenizer) -> str:
    """A tokenizer's identity: its class, length limit and vocabulary (with merges for fast tokenizers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{tokenizer.model_max_length}\0{text}".encode()).hexdigest()


class MaskedPromptFamily(DiffusionFamily):
    """Families whose denoiser reads one encoder's per-token embeddings and its attention mask (T5/Gemma: Sana, PixArt-Σ,
    Lumina 2); `encode_prompt_kwargs` are the pipeline's own encode_prompt options the family fixes."""

    encode_prompt_kwargs: dict = {}

    def encode_prompts(self, pipe, texts, max_sequence_length=None):
        embeds, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=pipe.text_encoder.device,
                                                max_sequence_length=max_sequence_length or self.default_max_sequence_length(pipe),
                                                **self.encode_prompt_kwargs)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def prompt_settings(self, pipe, max_sequence_length):
        return {**super().prompt_settings(pipe, max_sequence_length), **self.encode_prompt_kwargs}


def call_default(pipeline_class, argument: str):
    """The default of one of a pipeline's `__call__` arguments (what a plain `pipe(prompt)` uses)."""
    return inspect.signature(pipeline_class.__call__).parameters[argument].default
