"""kohya export loads back through diffusers' own kohya converter; merged models equal base + adapter."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from medfm.cli import main as medfm
from medfm.data.phantom import make_phantom, write_phantom_dataset
from medfm.data.report_batches import encode_prompts
from medfm.generate import base_of_adapter, load_report_model, text_to_image_base
from medfm.models.diffusion import load_pipeline
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
