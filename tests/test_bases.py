"""The tiny built-in bases: shipped pretrained weights, their version checks, and the recipe that makes them."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medfm.demo.index import REPO_INDEX, load_index
from medfm.generate import adapter_training_config
from medfm.models import shipped
from medfm.models.diffusion import SHIPPED_TINY_SD, TINY_SD_VERSION, build_tiny_sd_pipeline, load_pipeline, materialize_builtin_base, resolve_base
from medfm.models.vlm import SHIPPED_TINY_VLM, TINY_VLM_VERSION, load_vlm, resolve_vlm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import pretrain_tiny_bases  # noqa: E402


@pytest.mark.parametrize("name,version,task", [(SHIPPED_TINY_SD, TINY_SD_VERSION, "text-to-image"), (SHIPPED_TINY_VLM, TINY_VLM_VERSION, "report")])
def test_shipped_weights_match_this_medfm_and_stay_small(name, version, task):
    metadata = shipped.shipped_metadata(name)
    assert metadata["base_version"] == version and metadata["phantom_version"] == shipped.PHANTOM_VERSION
    assert metadata["left_out"] == shipped.LEFT_OUT_OF_PRETRAINING and metadata["task"] == task
    assert sum(p.stat().st_size for p in shipped.SHIPPED_DIR.glob("*.safetensors")) < 30e6


def test_the_builtin_text_to_image_base_carries_the_pretrained_weights():
    pipe = load_pipeline(str(materialize_builtin_base()))
    tensors = load_file(shipped.shipped_path(SHIPPED_TINY_SD))
    weight = pipe.unet.state_dict()["conv_in.weight"]
    assert weight.dtype == torch.float32 and torch.equal(weight, tensors["unet.conv_in.weight"].float())
    assert pipe.vae.config.scaling_factor == pytest.approx(float(shipped.shipped_metadata(SHIPPED_TINY_SD)["vae_scaling_factor"]))
    random = build_tiny_sd_pipeline().unet.state_dict()["conv_in.weight"]
    assert not torch.equal(weight, random)


def test_the_builtin_vlm_carries_the_pretrained_weights():
    model, _, _ = load_vlm("builtin:tiny-llava")
    tensors = load_file(shipped.shipped_path(SHIPPED_TINY_VLM))
    key = "lm_head.weight"
    assert torch.equal(model.state_dict()[key], tensors[f"model.{key}"].float())


@pytest.mark.parametrize("resolve,builtin", [(resolve_base, "builtin:tiny-sd"), (resolve_vlm, "builtin:tiny-llava")])
def test_a_base_name_pinned_to_other_weights_is_refused(resolve, builtin):
    assert resolve(shipped.pinned_name(builtin)) == resolve(builtin)  # pinned to the shipped weights: the same folder
    with pytest.raises(ValueError, match="trained on other weights.*adapters/build.py"):
        resolve(f"{builtin}@000000000000")
    with pytest.raises(ValueError, match="ships no pretrained weights"):
        resolve_vlm("builtin:tiny-qwen2-vl@000000000000")


def test_shipped_adapters_name_the_shipped_base_weights():
    """A new base file without rebuilt adapters (python adapters/build.py) fails here, not silently in users' hands."""
    for entry in load_index(REPO_INDEX):
        base = adapter_training_config(entry.adapter)["pretrained_model_name_or_path"]
        assert base == shipped.pinned_name(base.partition("@")[0]), entry.name


def test_a_version_mismatch_is_an_error_naming_the_rebuild_command(monkeypatch, tmp_path):
    pipe = build_tiny_sd_pipeline()
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    shipped.save_shipped_weights({"unet": pipe.unet}, "old", base_version="0", left_out="effusion", task="text-to-image")
    with pytest.raises(RuntimeError, match=r"pretrained for .*'base_version': '0'.*pretrain_tiny_bases.py text-to-image"):
        shipped.load_shipped_weights({"unet": pipe.unet}, "old", base_version=TINY_SD_VERSION)
    with pytest.raises(FileNotFoundError, match="missing"):
        shipped.load_shipped_weights({"unet": pipe.unet}, "absent", base_version=TINY_SD_VERSION)


def test_a_file_for_another_architecture_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    shipped.save_shipped_weights({"unet": torch.nn.Linear(2, 2)}, "other", base_version=TINY_SD_VERSION, left_out="effusion", task="text-to-image")
    with pytest.raises(RuntimeError, match="does not fit the unet architecture"):
        shipped.load_shipped_weights({"unet": build_tiny_sd_pipeline().unet}, "other", base_version=TINY_SD_VERSION)


@pytest.mark.slow
@pytest.mark.parametrize("task,steps", [("text-to-image", ["--vae_steps", "2", "--denoiser_steps", "2"]), ("report", ["--vision_steps", "2", "--steps", "2"])])
def test_the_pretraining_recipe_writes_weights_the_builtin_loader_accepts(monkeypatch, tmp_path, task, steps):
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    pretrain_tiny_bases.main([task, "--num_images", "8", *steps])
    name, version = (SHIPPED_TINY_SD, TINY_SD_VERSION) if task == "text-to-image" else (SHIPPED_TINY_VLM, TINY_VLM_VERSION)
    assert shipped.shipped_metadata(name)["left_out"] == shipped.LEFT_OUT_OF_PRETRAINING
    if task == "text-to-image":
        pipe = build_tiny_sd_pipeline()
        shipped.load_shipped_weights(pretrain_tiny_bases.pretrained_modules(pipe), name, version)
    else:
        model = pretrain_tiny_bases.build_tiny_vlm("llava")[0]
        shipped.load_shipped_weights({"model": model}, name, version)
