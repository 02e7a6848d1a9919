"""Tiny offline pipelines of the modern text-to-image families, and the offline T5/Gemma tokenizers they use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from transformers import AutoTokenizer

from medfm.models.tiny_diffusion import TINY_DIFFUSION_BUILDERS, build_tiny_flux, build_tiny_sana
from medfm.models.tokenizers import gemma_tokenizer, t5_tokenizer

REPORT = "FINDINGS: Small left pleural effusion. Mild cardiomegaly; no pneumothorax. IMPRESSION: Bibasilar atelectasis."
# Sana and PixArt-Σ snap the size to their aspect-ratio bins (512 px and up) unless told not to; the captions are clean.
CALL_KWARGS = {"sana": {"use_resolution_binning": False, "clean_caption": False}, "pixart-sigma": {"use_resolution_binning": False, "clean_caption": False}}
HAS_LORA_LOADER = {"sdxl": True, "sd3": True, "flux": True, "sana": True, "pixart-sigma": False, "lumina2": True}  # diffusers has no PixArt loader (#11216)


def generate(pipe: DiffusionPipeline, family: str) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(REPORT, num_inference_steps=2, height=64, width=64, output_type="np", generator=generator, **CALL_KWARGS.get(family, {})).images


@pytest.mark.parametrize("family", sorted(TINY_DIFFUSION_BUILDERS))
def test_tiny_pipeline_generates_and_round_trips_through_a_plain_folder(family, tmp_path):
    pipe = TINY_DIFFUSION_BUILDERS[family]()
    images = generate(pipe, family)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0.01

    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    assert 50_000 < sum(p.numel() for p in denoiser.parameters()) < 3_000_000

    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is type(pipe)
    np.testing.assert_array_equal(generate(loaded, family), images)
    assert hasattr(type(loaded), "load_lora_weights") == HAS_LORA_LOADER[family]


def test_seed_fixes_the_weights_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, again, other = build_tiny_sana(seed=0), build_tiny_sana(seed=0), build_tiny_sana(seed=1)
    assert torch.equal(torch.rand(1), expected_next)
    for name, weight in first.transformer.state_dict().items():
        assert torch.equal(weight, again.transformer.state_dict()[name]), name
    assert not torch.equal(first.transformer.proj_out.weight, other.transformer.proj_out.weight)


def test_flux_variants_differ_in_guidance_input_and_shift():
    dev, schnell = build_tiny_flux(), build_tiny_flux(guidance_embeds=False)
    assert dev.transformer.config.guidance_embeds and not schnell.transformer.config.guidance_embeds
    assert dev.scheduler.config.use_dynamic_shifting and not schnell.scheduler.config.use_dynamic_shifting


@pytest.mark.parametrize("build", [t5_tokenizer, gemma_tokenizer])
def test_offline_tokenizer_splits_reports_into_known_pieces_and_round_trips(build, tmp_path):
    tokenizer = build()
    pieces = tokenizer.tokenize(REPORT)
    assert tokenizer.unk_token not in pieces
    assert len(pieces) < len(REPORT) / 2.5  # words and word pieces, not characters
    for word in ("▁Small", "▁left", "▁no"):  # whole words, with their case
        assert word in pieces, word
    ids = tokenizer(REPORT).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == REPORT

    tokenizer.padding_side = "right" if tokenizer.padding_side == "left" else "left"  # as SanaPipeline does to its tokenizer
    assert build().padding_side != tokenizer.padding_side  # every call builds its own: pipelines never share one

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is type(tokenizer)
    assert loaded(REPORT).input_ids == ids


def test_t5_tokenizer_layout():
    tokenizer = t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("no effusion").input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.bos_token_id is None


def test_gemma_tokenizer_layout_and_byte_fallback():
    tokenizer = gemma_tokenizer()
    ids = tokenizer("no effusion").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<pad>") == tokenizer.pad_token_id
    text = "Lesion 5 µm → stable"
    pieces = tokenizer.tokenize(text)
    assert "<0xC2>" in pieces and tokenizer.unk_token not in pieces  # non-ASCII falls back to UTF-8 bytes
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
