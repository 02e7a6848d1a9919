"""The demo's index, input checks and model calls (the browser test is tests/test_demo_browser.py)."""

import json

import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import write_dicom
from medfm.cli import main as medfm
from medfm.demo.index import REPO_INDEX, load_index
from medfm.demo.inference import mentioned_labels
from medfm.demo.inputs import MAX_IMAGE_PIXELS, MAX_PROMPT_CHARS, InputError, check_prompt, read_upload
from medfm.generate import adapter_training_config


def test_shipped_index_lists_local_adapters_of_both_tasks():
    entries = load_index(REPO_INDEX)
    assert {e.task for e in entries} == {"text-to-image", "report"}
    for entry in entries:
        config = REPO_INDEX.parent / entry.adapter / "training_config.yaml"
        assert config.is_file(), f"{entry.name}: {config} missing (rebuild with python adapters/build.py)"
        assert "pretrained_model_name_or_path: builtin:" in config.read_text()  # portable: no machine-specific base folder
        assert entry.description


def test_index_keeps_hub_ids_and_names_bad_entries(tmp_path):
    (tmp_path / "local").mkdir()
    index = tmp_path / "index.yaml"
    index.write_text("adapters:\n  - {name: a, task: report, adapter: local}\n  - {name: b, task: text-to-image, adapter: someone/sd15-cxr-lora}\n")
    local, hub = load_index(index)
    assert local.adapter == str(tmp_path / "local") and hub.adapter == "someone/sd15-cxr-lora"
    index.write_text("adapters:\n  - {name: a, task: segmentation, adapter: local}\n")
    with pytest.raises(ValueError, match="entry 1 .*task 'segmentation'"):
        load_index(index)
    index.write_text("adapters:\n  - {name: a, adapter: local}\n")
    with pytest.raises(ValueError, match="entry 1 lacks task"):
        load_index(index)


def test_demo_command_names_a_missing_index(tmp_path):
    with pytest.raises(SystemExit, match=r"medfm demo: error: .*missing\.yaml: adapter index not found"):
        medfm(["demo", "--index", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("prompt, message", [("", "Type a prompt"), ("   ", "Type a prompt"), ("x" * 10_000, "10,000 characters; the limit is 1,000")])
def test_empty_and_overlong_prompts_are_refused(prompt, message):
    with pytest.raises(InputError, match=message):
        check_prompt(prompt)


def test_prompt_at_the_limit_is_kept_stripped():
    assert check_prompt(" " + "x" * MAX_PROMPT_CHARS + "\n") == "x" * MAX_PROMPT_CHARS


def test_50_megapixel_png_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("L", (10_000, 5_000)).save(path)
    monkeypatch.setattr("medfm.demo.inputs.read_radiograph", lambda *a, **k: pytest.fail("decoded a refused image"))
    with pytest.raises(InputError, match=f"huge.png: 50 megapixels; the limit is {MAX_IMAGE_PIXELS // 1_000_000}"):
        read_upload(path)


def test_dicom_size_comes_from_rows_and_columns(tmp_path):
    path = write_dicom(tmp_path / "big.dcm", np.zeros((4, 4)))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 8_000, 6_500  # the header claims 52 MP; the check must not need the pixels
    ds.save_as(path)
    with pytest.raises(InputError, match="big.dcm: 52 megapixels"):
        read_upload(path)


def test_dicom_without_pixel_data_and_non_images_get_clear_messages(tmp_path):
    with pytest.raises(InputError, match="no_pixels.dcm: DICOM has no pixel data"):
        read_upload(write_dicom(tmp_path / "no_pixels.dcm", np.zeros((8, 8)), with_pixels=False))
    (tmp_path / "notes.txt").write_text("not a radiograph")
    with pytest.raises(InputError, match="notes.txt: not an image medfm can read"):
        read_upload(tmp_path / "notes.txt")
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(InputError, match="fake.png"):
        read_upload(tmp_path / "fake.png")


def test_uploads_are_read_as_training_reads_them(tmp_path):
    pixels = np.tile(np.arange(64, dtype=np.uint16) * 60, (32, 1))
    from medfm.data.images import read_radiograph

    path = write_dicom(tmp_path / "x.dcm", pixels, photometric="MONOCHROME1")
    np.testing.assert_array_equal(read_upload(path), read_radiograph(path))
    assert read_upload(path)[0, 0] == 1.0  # MONOCHROME1 inverted: the lowest value is brightest
    Image.fromarray(pixels).save(tmp_path / "x16.png")
    np.testing.assert_array_equal(read_upload(tmp_path / "x16.png"), read_radiograph(tmp_path / "x16.png"))


@pytest.mark.slow
def test_generated_pairs_match_plain_generation_with_and_without_the_adapter(tmp_path):
    from medfm.demo.inference import generate_radiographs, text_to_image_pipeline
    from medfm.generate import generate_images

    adapter = next(e.adapter for e in load_index(REPO_INDEX) if e.task == "text-to-image")
    settings = {"negative_prompt": "Cardiomegaly.", "num_inference_steps": 2, "guidance_scale": 5.0, "seed": 3, "num_images": 2}
    with_adapter, base_only = generate_radiographs(adapter, "Large right pleural effusion.", tmp_path / "demo", compare=True, **settings)
    assert text_to_image_pipeline(adapter) is text_to_image_pipeline(adapter)  # loaded once, kept
    base = text_to_image_pipeline(adapter)[1]
    expected_adapted = generate_images(["Large right pleural effusion."], tmp_path / "a", adapter=adapter, **settings)
    expected_base = generate_images(["Large right pleural effusion."], tmp_path / "b", pretrained_model_name_or_path=base, **settings)
    for got, expected in zip(with_adapter + base_only, expected_adapted + expected_base, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(got)), np.asarray(Image.open(expected)))
    assert not np.array_equal(np.asarray(Image.open(with_adapter[0])), np.asarray(Image.open(base_only[0])))
    adapted_info, base_info = Image.open(with_adapter[0]).text, Image.open(base_only[0]).text
    assert adapted_info["adapter"] == adapter and base_info["adapter"] == "" and adapted_info["synthetic"] == base_info["synthetic"] == "true"
    assert adapted_info["seed"] == base_info["seed"] == "3" and adapted_info["prompt"] == "Large right pleural effusion."


@pytest.mark.slow
def test_report_matches_medfm_report_and_is_labelled(tmp_path):
    from medfm.data.phantom import make_phantom
    from medfm.data.studies import to_pil_rgb
    from medfm.demo.inference import write_report

    adapter = next(e.adapter for e in load_index(REPO_INDEX) if e.task == "report")
    image, _ = make_phantom(seed=10_015, size=256)  # held out; shows bilateral effusions, which only the adapted model reports
    Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "phantom.png")
    medfm(["report", "--adapter", adapter, "--image", str(tmp_path / "phantom.png"), "--max_new_tokens", "48", "--output", str(tmp_path / "r.jsonl")])
    expected = json.loads((tmp_path / "r.jsonl").read_text())["report"]
    image = to_pil_rgb(read_upload(tmp_path / "phantom.png"))
    assert write_report(adapter, image, max_new_tokens=48) == expected
    config = adapter_training_config(adapter)
    medfm(["report", "--pretrained_model_name_or_path", config["pretrained_model_name_or_path"], "--instruction", config["instruction"],
           "--image", str(tmp_path / "phantom.png"), "--max_new_tokens", "48", "--output", str(tmp_path / "base.jsonl")])
    base_alone = json.loads((tmp_path / "base.jsonl").read_text())["report"]
    assert write_report(adapter, image, max_new_tokens=48, base_only=True) == base_alone != expected  # the adapter changes the report
    assert write_report(adapter, image, max_new_tokens=48) == expected  # and is switched back on


def test_labels_shown_are_the_mentioned_observations():
    report = "Large right pleural effusion. No pneumothorax. Possible left lower lobe pneumonia."
    assert dict(mentioned_labels(report)) == {"Pleural Effusion": "positive", "Pneumothorax": "negative", "Pneumonia": "uncertain"}
