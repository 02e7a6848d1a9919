"""PixArt-Σ: DiT with adaLN-single, T5 encoder with attention mask, DDPM epsilon prediction; the transformer also outputs a
learned variance, split off and dropped (as PixArtSigmaPipeline does). diffusers has no PixArt LoRA loader, so the adapter
is a PEFT folder that `PeftModel.from_pretrained(pipe.transformer, folder)` loads."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from diffusers import PixArtSigmaPipeline
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ...paths import with_default_mode
from .base import MaskedPromptFamily
from .registry import register

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's own file names, so PeftModel.from_pretrained reads the folder
PEFT_PREFIX = "base_model.model."  # keys as PeftModel.save_pretrained writes them
CLEAN_CAPTION = False  # reports as written (their truncation counted these tokens); a plain pipe(prompt) cleans where bs4 and ftfy are installed


class PixArtSigma(MaskedPromptFamily):
    name = "pixart-sigma"
    display_name = "PixArt-Σ"
    pipeline_class = PixArtSigmaPipeline
    pipeline_class_names = ("PixArtSigmaPipeline",)
    large_text_encoders = ("text_encoder",)
    objective = "ddpm"
    objective_summary = "DDPM noise (epsilon) prediction (the transformer's learned-variance half is dropped)"
    lora_loader = "peft"
    recipe = "recipes/configs/pixart-sigma-mimic-cxr.yaml"
    encode_prompt_kwargs = {"clean_caption": CLEAN_CAPTION}

    def pipeline_kwargs(self, max_sequence_length):
        return {"use_resolution_binning": False, "clean_caption": CLEAN_CAPTION, **super().pipeline_kwargs(max_sequence_length)}

    def predict(self, pipe, denoiser, latents, timesteps, conditioning, cfg):
        prediction = denoiser(latents, encoder_hidden_states=conditioning["prompt_embeds"], encoder_attention_mask=conditioning["prompt_attention_mask"],
                              timestep=timesteps, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        if pipe.transformer.config.out_channels // 2 == latents.shape[1]:  # learned variance: keep the noise half
            prediction = prediction.chunk(2, dim=1)[0]
        return prediction

    # PEFT folder instead of a diffusers LoRA file -------------------------------------------------------------------
    def save_lora(self, directory, denoiser, text_encoders=None):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {PEFT_PREFIX + k: v.contiguous() for k, v in get_peft_model_state_dict(denoiser).items()}
        save_file(state, str(directory / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        with_default_mode(directory / PEFT_WEIGHTS_NAME)
        self.adapter_config(denoiser).save_pretrained(str(directory))  # adapter_config.json

    def lora_state_dict(self, directory):
        return {"transformer." + k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(Path(directory) / PEFT_WEIGHTS_NAME)).items()}

    def load_lora(self, directory, denoiser, text_encoders=None):
        state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(Path(directory) / PEFT_WEIGHTS_NAME)).items()}
        incompatible = set_peft_model_state_dict(denoiser, state, adapter_name="default")
        if incompatible is not None and getattr(incompatible, "unexpected_keys", None):
            raise ValueError(f"{directory}: LoRA keys that do not fit the transformer: {incompatible.unexpected_keys[:5]}")

    def load_adapter_into(self, pipe, folder):
        pipe.transformer = PeftModel.from_pretrained(pipe.transformer, str(folder))

    @contextmanager
    def adapter_disabled(self, pipe):
        with pipe.transformer.disable_adapter():
            yield pipe

    def fuse_adapter(self, pipe):
        pipe.transformer = pipe.transformer.merge_and_unload()

    def loading_snippet(self, base_expression, adapter_expression):
        return ("from diffusers import PixArtSigmaPipeline\nfrom peft import PeftModel\n\n"
                f"pipe = PixArtSigmaPipeline.from_pretrained({base_expression})\n"
                f"pipe.transformer = PeftModel.from_pretrained(pipe.transformer, {adapter_expression})")

    def build_tiny(self, seed=0):
        from ..tiny_diffusion import build_tiny_pixart_sigma

        return build_tiny_pixart_sigma(seed)


register(PixArtSigma())
