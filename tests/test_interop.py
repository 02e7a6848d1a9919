"""kohya export (SD, Flux) loads back through diffusers' own kohya converter; other families are refused by name; merged models equal base + adapter."""

import re

import numpy as np
import pytest
import torch
import yaml
from diffusers import FluxPipeline
from peft import LoraConfig
from PIL import Image
from safetensors.torch import load_file

from medfm.cli import main as medfm
from medfm.data.phantom import make_phantom, write_phantom_dataset
from medfm.data.report_batches import encode_prompts
from medfm.generate import base_of_adapter, load_report_model, text_to_image_base
from medfm.lora import attach_lora
from medfm.models.diffusion import load_pipeline
from medfm.models.families import DIFFUSION_FAMILIES
from medfm.models.vlm import load_vlm
from recipes.train_lora import main as train

pytestmark = pytest.mark.slow
PROMPT = "Large right pleural effusion."


@pytest.fixture(scope="module")
def text_to_image_adapter(tmp_path_factory):
    """A trained adapter with LoRA on the UNet and the text encoder."""
    root = tmp_path_factory.mktemp("t2i")
    data = write_phantom_dataset(root / "phantoms", num_images=8, seed=4, size=64)
    train(["--train_data_dir", str(data), "--output_dir", str(root / "adapter"), "--resolution", "64", "--train_batch_size", "4",
           "--max_train_steps", "6", "--learning_rate", "3e-3", "--train_text_encoder", "--lora_alpha", "8", "--validation_prompt", PROMPT,
           "--num_validation_images", "1", "--validation_inference_steps", "1", "--report_to", "none"])
    return root / "adapter"


def images(pipe_path, lora=None):
    pipe = load_pipeline(str(pipe_path))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images, pipe


def test_kohya_export_loads_through_diffusers_kohya_converter_with_identical_images(text_to_image_adapter, tmp_path, capsys):
    target = tmp_path / "cxr_kohya.safetensors"
    medfm(["export", str(text_to_image_adapter), "--format", "kohya", "--output", str(target)])
    assert str(target) in capsys.readouterr().out
    weights = load_file(target)
    assert all(k.startswith(("lora_unet_", "lora_te_")) and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in weights)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in weights
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in weights
    assert float(weights["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha"]) == 8.0

    base = text_to_image_base(text_to_image_adapter, None)
    plain, _ = images(base)
    medfm_format, _ = images(base, text_to_image_adapter)
    kohya, pipe = images(base, target)
    assert "lora" in str(type(pipe.text_encoder.encoder.layers[0].self_attn.q_proj)).lower()  # the text-encoder LoRA came back too
    assert np.abs(medfm_format - plain).max() > 0.01
    assert np.array_equal(kohya, medfm_format)


def test_kohya_export_of_a_report_adapter_is_refused(report_adapter):
    with pytest.raises(ValueError, match="report \\(PEFT\\) adapter; kohya export is for text-to-image"):
        medfm(["export", str(report_adapter), "--format", "kohya"])


def test_merged_pipeline_equals_base_plus_adapter(text_to_image_adapter, tmp_path):
    medfm(["merge", str(text_to_image_adapter), "--output_dir", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "model_index.json").is_file()
    merged, pipe = images(tmp_path / "merged")
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())
    with_adapter, _ = images(text_to_image_base(text_to_image_adapter, None), text_to_image_adapter)
    plain, _ = images(text_to_image_base(text_to_image_adapter, None))
    assert np.abs(merged - with_adapter).max() < 1e-3 < np.abs(with_adapter - plain).max()


@pytest.fixture(scope="module")
def report_adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "adapter"
    train(["--task", "report", "--phantom_num_images", "12", "--max_train_steps", "3", "--train_batch_size", "4", "--max_length", "256",
           "--num_validation_samples", "2", "--validation_max_new_tokens", "4", "--learning_rate", "5e-3", "--report_to", "none",
           "--output_dir", str(out)])
    return out


def report_logits(model, processor, family):
    image = Image.fromarray(np.round(make_phantom(7, 128)[0] * 255).astype(np.uint8)).convert("RGB")
    inputs = encode_prompts(processor, family, ["Describe the findings."], [[image]])
    with torch.no_grad():
        return model(**inputs).logits


def test_merged_report_model_equals_base_plus_adapter(report_adapter, tmp_path):
    medfm(["merge", str(report_adapter), "--output_dir", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "config.json").is_file() and not (tmp_path / "merged" / "adapter_config.json").exists()
    with_adapter = report_logits(*load_report_model(str(report_adapter), device="cpu"))
    merged_model, processor, family = load_vlm(str(tmp_path / "merged"))
    merged = report_logits(merged_model.eval(), processor, family)
    plain_model, _, _ = load_vlm(base_of_adapter(report_adapter))
    plain = report_logits(plain_model.eval(), processor, family)
    assert torch.allclose(merged, with_adapter, atol=1e-4)
    assert (with_adapter - plain).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------- families beyond SD
FLUX_DOUBLE_BLOCK = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",  # to_k left out: its part of the fused qkv is zero
                     "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj",
                     "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.net.2",
                     "single_transformer_blocks.0.proj_out"]


def random_adapter(family_name, base, folder, targets, rank=4, alpha=8):
    """A family's adapter as medfm saves it, its LoRA up matrices drawn at random (a trained adapter's are not zero)."""
    family = DIFFUSION_FAMILIES[family_name]
    pipe = family.load_pipeline(str(base))
    denoiser = family.get_denoiser(pipe)
    attach_lora(denoiser, rank, alpha, 0.0, targets)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in denoiser.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    family.save_lora(folder, denoiser)
    (folder / "training_config.yaml").write_text(yaml.safe_dump({"task": "text-to-image", "pretrained_model_name_or_path": str(base)}))
    return folder


def flux_images(base, lora=None):
    pipe = FluxPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe(PROMPT, num_inference_steps=2, height=64, width=64, max_sequence_length=16, generator=torch.Generator().manual_seed(0),
                output_type="np").images, pipe


def test_flux_kohya_export_in_bfl_names_loads_through_diffusers_with_identical_images(tiny_bases, tmp_path):
    base = tiny_bases("flux")
    adapter = random_adapter("flux", base, tmp_path / "adapter", FLUX_DOUBLE_BLOCK)
    target = tmp_path / "flux_kohya.safetensors"
    medfm(["export", str(adapter), "--format", "kohya", "--output", str(target)])
    weights = load_file(target)
    assert {k.rsplit(".", 2)[0] if "lora_" in k.rsplit(".", 2)[-2] else k.rsplit(".", 1)[0] for k in weights} == {
        "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
        "lora_unet_double_blocks_0_txt_attn_proj", "lora_unet_double_blocks_0_img_mlp_2", "lora_unet_single_blocks_0_linear2"}
    assert weights["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 3 * 4  # q, k, v fused: rank 3 x 4
    assert float(weights["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3 * 8  # alpha / rank kept
    assert float(weights["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == 8

    plain, _ = flux_images(base)
    medfm_format, loaded = flux_images(base, adapter)
    assert {n.rsplit(".lora_", 1)[0] for n, _ in loaded.transformer.named_parameters() if ".lora_" in n} == set(FLUX_DOUBLE_BLOCK)  # none dropped
    kohya, _ = flux_images(base, target)
    assert np.abs(medfm_format - plain).max() > 0.01
    np.testing.assert_allclose(kohya, medfm_format, atol=1e-5)


def test_flux_single_block_attention_at_a_width_the_kohya_readers_do_not_know_is_refused(tiny_bases, tmp_path):
    """diffusers reads a single block's fused linear1 only at FLUX.1's widths (3072); a tiny base's is refused by name, not written."""
    adapter = random_adapter("flux", tiny_bases("flux"), tmp_path / "adapter", ["to_q", "to_k", "to_v"])
    with pytest.raises(ValueError, match="diffusers cannot read this adapter back from the Flux.1 kohya layout"):
        medfm(["export", str(adapter), "--format", "kohya", "--output", str(tmp_path / "out.safetensors")])
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("name", ["sd3", "sana", "lumina2", "pixart-sigma"])
def test_families_without_an_established_kohya_layout_name_the_portable_folder(name, tiny_bases, tmp_path):
    adapter = random_adapter(name, tiny_bases(name), tmp_path / "adapter", ["to_q"])
    folder_format = "PEFT" if name == "pixart-sigma" else "diffusers"
    display = re.escape(DIFFUSION_FAMILIES[name].display_name)
    portable = rf"{display} adapters have no kohya/ComfyUI LoRA layout.*the adapter folder \({folder_format} format\) is the portable"
    with pytest.raises(ValueError, match=portable):
        medfm(["export", str(adapter), "--format", "kohya"])


def test_flux_single_block_attention_at_flux1_width_reads_back_through_diffusers(tiny_bases, tmp_path):
    """At FLUX.1's width (3072) a single block's q, k, v LoRAs go into BFL's fused linear1 (q, k, v, MLP input): diffusers' reader
    gives back each one's update and a zero one for the MLP input. Only the LoRA tensors are made: no 12B model needed."""
    width, rank, alpha = 3072, 4, 8
    generator = torch.Generator().manual_seed(0)
    layers = {f"single_transformer_blocks.0.attn.{part}.{ab}.weight": torch.randn(shape, generator=generator) * 0.1
              for part in ("to_q", "to_k", "to_v") for ab, shape in (("lora_A", (rank, width)), ("lora_B", (width, rank)))}
    adapter = tmp_path / "adapter"
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v"])
    FluxPipeline.save_lora_weights(adapter, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict(),
                                   weight_name="pytorch_lora_weights.safetensors")
    (adapter / "training_config.yaml").write_text(yaml.safe_dump({"task": "text-to-image", "pretrained_model_name_or_path": str(tiny_bases("flux"))}))
    target = tmp_path / "flux_kohya.safetensors"
    medfm(["export", str(adapter), "--format", "kohya", "--output", str(target)])
    weights = load_file(target)
    assert weights["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (4 * rank, width)
    assert weights["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * width + 4 * width, 4 * rank)
    back = FluxPipeline.lora_state_dict(str(target))
    back = back[0] if isinstance(back, tuple) else back
    for part in ("to_q", "to_k", "to_v"):
        module = f"single_transformer_blocks.0.attn.{part}"
        expected = layers[f"{module}.lora_B.weight"] @ layers[f"{module}.lora_A.weight"] * alpha / rank
        torch.testing.assert_close(back[f"transformer.{module}.lora_B.weight"] @ back[f"transformer.{module}.lora_A.weight"], expected)
    assert not back["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"].any()
