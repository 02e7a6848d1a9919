"""Model cards: every section present, the load snippet runs as written, `medfm eval --adapter` fills the evaluation."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from PIL import Image

from medfm.cli import main as medfm
from medfm.config import TrainConfig, save_config
from medfm.data.phantom import make_phantom, write_phantom_dataset
from medfm.hub import write_report_card, write_text_to_image_card
from medfm.lora import attach_lora
from medfm.models.diffusion import load_pipeline, resolve_base
from medfm.models.families import DIFFUSION_FAMILIES
from medfm.models.shipped import pinned_name
from medfm.models.vlm import load_vlm, resolve_vlm

DESCRIPTION = "MIMIC-CXR-JPG 2.0.0 frontal views, impression sections, official train split."


def python_block(card_text: str) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", card_text, re.DOTALL)
    return code


def run_snippet(code: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def text_to_image_folder(tmp_path):
    """An adapter folder as the recipe writes it (LoRA weights, training_config.yaml, README.md), named relative to tmp_path."""
    base = resolve_base("builtin:tiny-sd")
    parts = load_pipeline(base)
    attach_lora(parts.unet, 4, 4, 0.0, ["to_k", "to_q", "to_v", "to_out.0"])
    config = TrainConfig(output_dir="cxr-lora", pretrained_model_name_or_path=base, train_data_dir="/data/mimic-cxr-pairs",
                         dataset_description=DESCRIPTION)
    folder = tmp_path / "cxr-lora"
    DIFFUSION_FAMILIES["sd"].save_lora(folder, parts.unet)
    save_config(config, folder / "training_config.yaml")
    write_text_to_image_card(folder, config, num_pairs=120, num_bad=3)
    return folder


@pytest.mark.slow
def test_text_to_image_card_is_complete_and_its_snippet_runs(text_to_image_folder, tmp_path):
    text = (text_to_image_folder / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image" and "lora" in card.data.tags
    for section in ("## Use it with plain diffusers", "## Training data", "## Evaluation", "## Training", "## Intended use, limitations and risks"):
        assert section in text, section
    assert DESCRIPTION in text and "`/data/mimic-cxr-pairs`" in text and "| rank | 4 |" in text and "120 image–report pairs" in text
    assert "not for diagnosis" in text.lower() or "must not be used for diagnosis" in text
    assert "Memorization audit: not run yet" in text and "No `medfm eval` results recorded yet" in text

    result = run_snippet(python_block(text), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(tmp_path / "radiograph.png").mode == "RGB"


@pytest.mark.slow
@pytest.mark.parametrize("named", ["folder", "built-in name"])
def test_report_card_snippet_runs(named, tmp_path):
    """As a user copies it: from a base folder, and from medfm's built-in base, which plain transformers cannot resolve."""
    folder_base = resolve_vlm("builtin:tiny-llava")
    base = folder_base if named == "folder" else pinned_name("builtin:tiny-llava")
    model, processor, family = load_vlm(folder_base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=family.language_model_pattern, task_type="CAUSAL_LM"))
    config = TrainConfig(task="report", output_dir="report-lora", pretrained_model_name_or_path=base, dataset_description=DESCRIPTION)
    folder = tmp_path / "report-lora"
    peft_model.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_report_card(folder, config, family, num_studies=40, num_bad=0, num_truncated=1, metrics={"bleu4": 0.1, "rougeL": 0.3})
    text = (folder / "README.md").read_text()
    assert "library_name: peft" in text and DESCRIPTION in text and "## Evaluation" in text and "| bleu4 | 0.1000 |" in text
    Image.fromarray(np.round(make_phantom(2, 128)[0] * 255).astype(np.uint8)).save(tmp_path / "chest_xray.png")
    code = python_block(text).replace("max_new_tokens=256", "max_new_tokens=4")
    assert ("resolve_vlm(" in code) == (named == "built-in name")
    result = run_snippet(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()  # the report it wrote


def test_eval_reports_with_adapter_records_metrics_in_the_card_and_model_index(text_to_image_folder, tmp_path):
    refs, preds = tmp_path / "refs.jsonl", tmp_path / "preds.jsonl"
    reports = ["Large right pleural effusion.", "No acute cardiopulmonary process.", "Cardiomegaly without edema."]
    refs.write_text("".join(json.dumps({"id": i, "report": r}) + "\n" for i, r in enumerate(reports)))
    preds.write_text("".join(json.dumps({"id": i, "report": r}) + "\n" for i, r in enumerate(reports[:2] + ["Small left pneumothorax."])))
    medfm(["eval", "reports", "--references", str(refs), "--predictions", str(preds), "--output_dir", str(tmp_path / "ev"), "--bootstrap", "20",
           "--adapter", str(text_to_image_folder)])
    recorded = json.loads((text_to_image_folder / "eval_results.json").read_text())
    measured = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    rouge = next(row for row in recorded["reports"]["summary"] if row["metric"] == "rougeL")
    assert rouge["value"] == measured["rougeL"]["value"] and rouge["ci95"] == measured["rougeL"]["ci95"]
    text = (text_to_image_folder / "README.md").read_text()
    assert "### Reports (`medfm eval reports`)" in text and f"| rougeL | {measured['rougeL']['value']:.4f} |" in text
    assert "No `medfm eval` results recorded yet" not in text and text.count("## Evaluation") == 1
    card = ModelCard(text)
    index = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert index["rougeL"] == measured["rougeL"]["value"] and card.data.model_name == "cxr-lora"
    assert "model-index:" in text


@pytest.mark.slow
def test_eval_images_with_training_dir_records_the_memorization_audit(text_to_image_folder, tmp_path):
    real = write_phantom_dataset(tmp_path / "real", 6, seed=1, size=64)
    generated = write_phantom_dataset(tmp_path / "generated", 6, seed=2, size=64)
    medfm(["eval", "images", "--real", str(real), "--generated", str(generated), "--training_dir", str(real), "--resolution", "64",
           "--output_dir", str(tmp_path / "ev"), "--adapter", str(text_to_image_folder)])
    audit = json.loads((tmp_path / "ev" / "metrics.json").read_text())["memorization"]
    text = (text_to_image_folder / "README.md").read_text()
    assert f"{audit['near_copy_rate']:.1%} of 6 generated images are near-copies" in text and "not run yet" not in text
    assert "### Images (`medfm eval images`)" in text and "| fid (inception) |" in text and "| precision (inception) |" in text


def test_eval_adapter_must_be_a_local_adapter_folder(tmp_path):
    (tmp_path / "refs.txt").write_text("Cardiomegaly.\n")
    with pytest.raises(SystemExit, match="results are recorded into a local adapter folder"):
        medfm(["eval", "reports", "--references", str(tmp_path / "refs.txt"), "--predictions", str(tmp_path / "refs.txt"),
               "--output_dir", str(tmp_path / "ev"), "--bootstrap", "0", "--adapter", "someone/remote-lora"])
