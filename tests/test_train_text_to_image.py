"""End-to-end text-to-image LoRA runs on the tiny base (seconds each on CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from conftest import write_dicom
from medfm.cli import main as medfm
from medfm.config import BUILTIN_TINY_SD
from medfm.data.pairs import BadRowError
from medfm.data.phantom import make_phantom, write_phantom_dataset
from medfm.lora import LORA_WEIGHTS_NAME, attach_lora
from medfm.models.diffusion import build_tiny_sd_pipeline, load_pipeline, resolve_base
from medfm.models.families import DIFFUSION_FAMILIES
from medfm.models.shipped import pinned_name
from recipes.train_lora import main as train

pytestmark = pytest.mark.slow
PROMPT = "Large right pleural effusion."


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return str(write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), num_images=16, seed=3, size=64))


def fast(data_dir, output_dir, *extra):
    return ["--train_data_dir", str(data_dir), "--output_dir", str(output_dir), "--resolution", "64", "--train_batch_size", "4",
            "--validation_prompt", PROMPT, "--num_validation_images", "1", "--validation_inference_steps", "2",
            "--report_to", "none", *map(str, extra)]


def recorded_base(adapter) -> str:
    return yaml.safe_load((adapter / "training_config.yaml").read_text())["pretrained_model_name_or_path"]


def plain_diffusers_images(base, adapter=None, **kwargs):
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if adapter:
        pipe.load_lora_weights(adapter)
    return pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), **kwargs).images


def test_adapter_folder_loads_in_plain_diffusers_and_generate_matches_it(phantoms, tmp_path):
    out = tmp_path / "run"
    train(fast(phantoms, out, "--max_train_steps", 15, "--learning_rate", 1e-3))
    for name in (LORA_WEIGHTS_NAME, "README.md", "training_config.yaml", "bad_rows.jsonl", "validation/step-000000.png", "validation/step-000015.png"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "pipeline_tag: text-to-image" in card
    assert all(tag in card for tag in ("- lora", "- medical", "- radiology")) and "load_lora_weights" in card
    recorded = recorded_base(out)
    assert recorded == pinned_name(BUILTIN_TINY_SD) and f'resolve_base("{recorded}")' in card  # portable, not this machine's folder
    base = resolve_base(recorded)

    before = np.asarray(plain_diffusers_images(base)[0], dtype=np.int16)
    after = np.asarray(plain_diffusers_images(base, str(out))[0], dtype=np.int16)
    assert np.abs(after - before).mean() > 1.0  # the adapter changes the image at a fixed seed

    medfm(["generate", "--adapter", str(out), "--prompt", PROMPT, "--num_inference_steps", "3", "--seed", "0", "--output_dir", str(tmp_path / "gen")])
    png = Image.open(tmp_path / "gen" / "0000-00.png")
    assert np.array_equal(np.asarray(png, dtype=np.int16), after)  # pixel for pixel
    assert png.text["prompt"] == PROMPT and png.text["seed"] == "0" and png.text["synthetic"] == "true"
    assert png.text["adapter"] == str(out) and png.text["base_model"] == base
    row = json.loads((tmp_path / "gen" / "metadata.jsonl").read_text().splitlines()[0])
    assert row["file_name"] == "0000-00.png" and row["text"] == PROMPT


def test_resume_gives_the_same_adapter_as_a_straight_run(phantoms, tmp_path):
    common = ["--checkpointing_steps", 5, "--learning_rate", 1e-3]
    train(fast(phantoms, tmp_path / "straight", "--max_train_steps", 10, *common))
    train(fast(phantoms, tmp_path / "resumed", "--max_train_steps", 5, *common))
    assert (tmp_path / "resumed" / "checkpoint-5").is_dir()
    train(fast(phantoms, tmp_path / "resumed", "--max_train_steps", 10, "--resume_from_checkpoint", "latest", *common))
    straight = load_file(tmp_path / "straight" / LORA_WEIGHTS_NAME)
    resumed = load_file(tmp_path / "resumed" / LORA_WEIGHTS_NAME)
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)
    initial = load_file(tmp_path / "resumed" / "checkpoint-5" / LORA_WEIGHTS_NAME)
    assert any(not torch.equal(initial[k], straight[k]) for k in straight)  # the last 5 steps did change something


def test_checkpoints_total_limit_keeps_the_newest(phantoms, tmp_path):
    train(fast(phantoms, tmp_path, "--max_train_steps", 6, "--checkpointing_steps", 2, "--checkpoints_total_limit", 2))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_text_encoder_lora_round_trip(phantoms, tmp_path):
    train(fast(phantoms, tmp_path, "--max_train_steps", 8, "--learning_rate", 1e-2, "--train_text_encoder", "--rank", 8, "--lora_alpha", 16))
    weights = load_file(tmp_path / LORA_WEIGHTS_NAME)
    assert any(k.startswith("text_encoder.") for k in weights) and any(k.startswith("unet.") for k in weights)
    base = resolve_base(recorded_base(tmp_path))
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    ids = pipe.tokenizer([PROMPT], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        base_embedding = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(str(tmp_path))
        diffusers_embedding = pipe.text_encoder(ids)[0]
    assert (diffusers_embedding - base_embedding).abs().max() > 1e-4

    parts = load_pipeline(base)  # medfm's own loader (used for resume) agrees with diffusers'
    attach_lora(parts.unet, 8, 16, 0.0, ["to_k", "to_q", "to_v", "to_out.0"])
    attach_lora(parts.text_encoder, 8, 16, 0.0, ["q_proj", "k_proj", "v_proj", "out_proj"])
    DIFFUSION_FAMILIES["sd"].load_lora(tmp_path, parts.unet, {"text_encoder": parts.text_encoder})
    with torch.no_grad():
        torch.testing.assert_close(parts.text_encoder(ids)[0], diffusers_embedding)


def test_sd2_class_base_with_v_prediction_bf16_and_gradient_checkpointing(phantoms, tmp_path):
    build_tiny_sd_pipeline(prediction_type="v_prediction").save_pretrained(tmp_path / "tiny-sd2")
    out = tmp_path / "run"
    train(fast(phantoms, out, "--pretrained_model_name_or_path", tmp_path / "tiny-sd2", "--max_train_steps", 3, "--snr_gamma", 5.0, "--noise_offset", 0.05,
                          "--mixed_precision", "bf16", "--gradient_checkpointing", "--train_text_encoder"))
    weights = load_file(out / LORA_WEIGHTS_NAME)
    assert all(w.dtype == torch.float32 for w in weights.values())  # LoRA trained and saved in fp32 under bf16
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny-sd2", safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.load_lora_weights(str(out))
    assert pipe.unet.config.use_linear_projection


def _mixed_folder(folder: Path) -> list[str]:
    """8-bit PNG, 16-bit PNG, JPEG, DICOM MONOCHROME1/2 that read fine, then a truncated file, a missing file, an empty report."""
    image, record = make_phantom(1, 64)
    text = record["impression"]
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folder / "eight.png")
    Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(folder / "sixteen.png")
    Image.fromarray(np.round(image * 255).astype(np.uint8)).convert("RGB").save(folder / "photo.jpg")
    write_dicom(folder / "m2.dcm", np.round(image * 4095), "MONOCHROME2")
    write_dicom(folder / "m1.dcm", np.round((1 - image) * 4095), "MONOCHROME1")
    (folder / "truncated.png").write_bytes((folder / "eight.png").read_bytes()[:200])
    rows = [("eight.png", text), ("sixteen.png", text), ("photo.jpg", text), ("truncated.png", text), ("m2.dcm", text),
            ("missing.png", text), ("m1.dcm", text), ("eight.png", "")]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows))
    return ["metadata.jsonl:4", "metadata.jsonl:6", "metadata.jsonl:8"]


def test_mixed_folder_trains_to_the_end_and_lists_exactly_the_bad_rows(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    expected_bad = _mixed_folder(data)
    out = tmp_path / "run"
    train(fast(data, out, "--max_train_steps", 4, "--train_batch_size", 2))
    bad = [json.loads(line) for line in (out / "bad_rows.jsonl").read_text().splitlines()]
    assert [row["row_id"] for row in bad] == expected_bad
    reasons = [row["reason"] for row in bad]
    assert "cannot decode image" in reasons[0] and reasons[1] == "image file not found" and reasons[2].startswith("empty report")
    assert bad[0]["source"].endswith("truncated.png")
    assert (out / LORA_WEIGHTS_NAME).is_file()

    with pytest.raises(BadRowError, match=r"metadata.jsonl:4 \(.*truncated.png\)"):
        train(fast(data, tmp_path / "strict", "--max_train_steps", 4, "--strict"))


def test_accelerate_launch_runs_the_recipe(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(repo / "recipes" / "train_lora.py"),
               "--max_train_steps", "2", "--phantom_num_images", "8", "--resolution", "64", "--train_batch_size", "2",
               "--validation_prompt", PROMPT, "--num_validation_images", "1", "--validation_inference_steps", "2",
               "--output_dir", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Adapter saved to {(tmp_path / 'run').resolve()}" in result.stdout
    assert (tmp_path / "run" / "logs").is_dir()  # TensorBoard logs
