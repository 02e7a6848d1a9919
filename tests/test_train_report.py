"""End-to-end report LoRA runs on each tiny VLM family: train, save, reload with plain transformers + peft, generate."""

import json

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import write_dicom
from medfm.cli import main as medfm
from medfm.config import BUILTIN_BASE_RECIPES, BUILTIN_TINY_VLM
from medfm.data.phantom import make_phantom
from medfm.models.shipped import pinned_name
from medfm.models.vlm import BUILTIN_TINY_VLMS, VLM_FAMILIES, resolve_vlm
from recipes.train_lora import main as train

pytestmark = pytest.mark.slow
FAMILY_BUILTINS = {family: name for name, family in BUILTIN_TINY_VLMS.items()}


def run(family, output_dir, *extra):
    train(["--task", "report", "--pretrained_model_name_or_path", FAMILY_BUILTINS[family], "--phantom_num_images", "16",
           "--max_train_steps", "3", "--train_batch_size", "4", "--max_length", "256", "--num_validation_samples", "2",
           "--validation_max_new_tokens", "4", "--learning_rate", "1e-3", "--lr_scheduler", "constant",  # a few steps: no warm-up, no decay
           "--report_to", "none", "--output_dir", str(output_dir),
           *map(str, extra)])


def plain_peft_report(adapter, image_path, instruction, family):
    """What a user does following the model card: plain transformers + peft, medfm only to write its built-in base to a folder."""
    base = resolve_vlm(yaml.safe_load((adapter / "training_config.yaml").read_text())["pretrained_model_name_or_path"])
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), str(adapter)).eval()
    processor = AutoProcessor.from_pretrained(str(adapter))
    image = Image.open(image_path).convert("RGB")
    if family == "paligemma":
        inputs = processor(text=["<image>" + instruction], images=[[image]], return_tensors="pt")
        inputs.pop("labels", None)
    else:
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": instruction}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


@pytest.mark.parametrize("family", list(VLM_FAMILIES))
def test_adapter_loads_with_plain_peft_and_matches_medfm_report(family, tmp_path, capsys):
    out = tmp_path / "adapter"
    run(family, out, "--train_projector")
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "training_config.yaml", "bad_rows.jsonl",
                 "validation/step-000000.jsonl", "validation/step-000003.jsonl"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "pipeline_tag: image-text-to-text" in card and "PeftModel.from_pretrained" in card
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["modules_to_save"]  # the projector is trained fully

    image = tmp_path / "cxr.png"
    Image.fromarray(np.round(make_phantom(5, 128)[0] * 255).astype(np.uint8)).save(image)
    instruction = yaml.safe_load((out / "training_config.yaml").read_text())["instruction"]
    expected = plain_peft_report(out, image, instruction, family)
    capsys.readouterr()
    medfm(["report", "--adapter", str(out), "--image", str(image), "--max_new_tokens", "12"])
    assert capsys.readouterr().out.strip() == expected


def test_report_training_changes_generations(tmp_path):
    out = tmp_path / "adapter"
    run("llava", out, "--max_train_steps", 6, "--lora_on_vision_tower", "--modules_to_save", "lm_head", "--learning_rate", 1e-2)
    before, after = ([json.loads(line)["generated"] for line in (out / "validation" / name).read_text().splitlines()]
                     for name in ("step-000000.jsonl", "step-000006.jsonl"))
    assert before != after  # the built-in base is pretrained: a few steps at a high rate must still change what it writes


def test_report_reads_dicom_like_the_same_png(tmp_path, capsys):
    """DICOM intake on the pretrained built-in base (it writes reports on its own), so the check does not hang on a training run."""
    image, _ = make_phantom(9, 96)
    image = (image - image.min()) / (image.max() - image.min())  # DICOM is min-max normalised; make the PNG match
    write_dicom(tmp_path / "cxr.dcm", np.round(image * 4095), "MONOCHROME2")
    (tmp_path / "folder").mkdir()
    write_dicom(tmp_path / "folder" / "a.dcm", np.round((1 - image) * 4095), "MONOCHROME1")
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(tmp_path / "folder" / "b.png")
    base = ["--pretrained_model_name_or_path", FAMILY_BUILTINS["llava"], "--instruction", BUILTIN_BASE_RECIPES[BUILTIN_TINY_VLM]["instruction"],
            "--max_new_tokens", "8"]
    capsys.readouterr()
    medfm(["report", *base, "--image", str(tmp_path / "cxr.dcm")])
    from_dicom = capsys.readouterr().out.strip()
    assert from_dicom
    medfm(["report", *base, "--input_dir", str(tmp_path / "folder"), "--output", str(tmp_path / "out.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["images"][0].rsplit("/", 1)[1] for r in rows] == ["a.dcm", "b.png"]
    assert rows[0]["report"] == rows[1]["report"] == from_dicom  # MONOCHROME1 DICOM reads like the same PNG


def test_first_run_on_a_new_machine_trains_like_later_runs(tmp_path, monkeypatch):
    """Building the built-in base (only the first run does) draws random numbers; the LoRA starts from the seed regardless."""
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "fresh-home"))
    adapters = [tmp_path / "cold", tmp_path / "warm"]
    for adapter in adapters:
        run("llava", adapter, "--num_validation_samples", 0)
    cold, warm = (load_file(adapter / "adapter_model.safetensors") for adapter in adapters)
    assert cold.keys() == warm.keys() and all(torch.equal(cold[name], warm[name]) for name in cold)
    # the adapter names the built-in base, pinned to its weights, not the folder it was written to on this machine
    pinned = pinned_name(BUILTIN_TINY_VLM)
    assert yaml.safe_load((adapters[0] / "training_config.yaml").read_text())["pretrained_model_name_or_path"] == pinned
    assert json.loads((adapters[0] / "adapter_config.json").read_text())["base_model_name_or_path"] == pinned
    assert f'resolve_vlm("{pinned}")' in (adapters[0] / "README.md").read_text()
