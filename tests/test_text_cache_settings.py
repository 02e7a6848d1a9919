"""The text-embedding cache key holds every per-family encode setting (prompt length, Sana's instruction, Lumina 2's system
prompt): changing one misses the cache and the batches carry embeddings made with the new setting; a setting the family
does not read (SDXL's prompt length) still hits."""

import pytest
import torch

from medfm.config import parse_train_config
from medfm.models.families import DIFFUSION_FAMILIES
from medfm.train.text_to_image import TextToImageLoRARecipe

pytestmark = pytest.mark.slow


def cached_text(base, cache, max_sequence_length, change=lambda recipe: None):
    """Set up a recipe on 3 phantoms with a text cache; returns (cache files, {batch key: embeddings of example 0}, recipe)."""
    args = ["--pretrained_model_name_or_path", base, "--output_dir", str(cache.parent / "run"), "--resolution", "64", "--phantom_num_images", "3",
            "--max_sequence_length", str(max_sequence_length), "--cache_dir", str(cache), "--no-cache_latents", "--report_to", "none"]
    recipe = TextToImageLoRARecipe(parse_train_config(args, exit_on_error=False))
    recipe._setup_accelerator()
    recipe._setup_models()
    change(recipe)
    recipe._setup_data()
    example = recipe.train_dataloader.dataset[0]
    return set((cache / "text-embeddings").rglob("*.safetensors")), example, recipe


def set_system_prompt(recipe):
    recipe.pipe.system_prompt = "You are an assistant that draws chest radiographs."


CHANGES = {  # family: (first length, second length, change applied to the second run's loaded pipeline)
    "lumina2": (72, 72, set_system_prompt),  # its system prompt (52 tiny-Gemma tokens) comes first within the length
    "sana": (16, 16, "instruction"),
    "sd3": (16, 24, None),  # the T5 length; Flux, PixArt-Σ and Lumina 2 key it the same way (DiffusionFamily.prompt_settings)
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_changing_an_encode_setting_misses_the_text_cache(name, tiny_bases, tmp_path, monkeypatch):
    first_length, second_length, change = CHANGES[name]
    cache = tmp_path / "cache"
    first, old, _ = cached_text(tiny_bases(name), cache, first_length)
    assert len(first) == 3
    again, _, _ = cached_text(tiny_bases(name), cache, first_length)
    assert again == first  # the same settings hit
    if change == "instruction":  # what SanaPipeline prepends (a diffusers default) changes
        monkeypatch.setitem(DIFFUSION_FAMILIES["sana"].encode_prompt_kwargs, "complex_human_instruction", ["Given a report, draw the chest radiograph:"])
    second, new, recipe = cached_text(tiny_bases(name), cache, second_length, change if callable(change) else lambda recipe: None)
    assert len(second - first) == 3  # every caption encoded again, nothing read from the old entries
    fresh = recipe.family.encode_prompts(recipe.pipe, [recipe.dataset.text(0)], second_length)
    for key, value in fresh.items():
        torch.testing.assert_close(new[key], value[0].to(new[key].dtype), msg=key)  # the batch carries the new setting's embeddings
    assert any(old[key].shape != new[key].shape or not torch.equal(old[key], new[key]) for key in fresh)  # and the setting mattered


def test_a_setting_the_family_does_not_read_still_hits(tiny_bases, tmp_path):
    """SDXL encodes with CLIP's fixed 77 tokens: another --max_sequence_length gives the same embeddings, so the same entries."""
    cache = tmp_path / "cache"
    first, old, _ = cached_text(tiny_bases("sdxl"), cache, 16)
    second, new, _ = cached_text(tiny_bases("sdxl"), cache, 64)
    assert first == second and len(first) == 3
    assert all(torch.equal(old[key], new[key]) for key in ("prompt_embeds", "pooled_prompt_embeds"))
