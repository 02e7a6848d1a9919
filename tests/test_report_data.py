"""Report-generation data: study layouts and batches whose loss covers report tokens only."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_dicom
from medfm.data.report_batches import IGNORE_INDEX, ReportCollator, encode_prompts, end_token_id, report_token_loss
from medfm.data.studies import ReportStudyDataset, load_studies
from medfm.models.vlm import BUILTIN_TINY_VLMS, VLM_FAMILIES, answer_prefix, load_vlm

FAMILY_BUILTINS = {family: name for name, family in BUILTIN_TINY_VLMS.items()}
REPORT = "The heart is enlarged. Small left pleural effusion. No pneumothorax."
each_family = pytest.mark.parametrize("family", list(VLM_FAMILIES))


def png(path, seed=0):
    Image.fromarray((np.random.default_rng(seed).random((48, 40)) * 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def vlm():
    loaded = {}

    def get(family):
        if family not in loaded:
            loaded[family] = load_vlm(FAMILY_BUILTINS[family])
        return loaded[family]

    return get


def study(images, report=REPORT, indication=None, row_id="s1"):
    return {"row_id": row_id, "images": [Image.open(i).convert("RGB") for i in images], "report": report, "indication": indication}


def test_r2gen_annotation_with_splits_and_image_lists(tmp_path):
    (tmp_path / "images" / "CXR1").mkdir(parents=True)
    paths = [png(tmp_path / "images" / "CXR1" / f"{i}.png", i) for i in range(2)]
    annotation = {"train": [{"id": "CXR1", "report": "The lungs are clear.", "image_path": ["CXR1/0.png", "CXR1/1.png"], "split": "train"}],
                  "val": [{"id": "CXR2", "report": "Cardiomegaly.", "image_path": ["CXR2/0.png"], "split": "val"}], "test": []}
    (tmp_path / "annotation.json").write_text(json.dumps(annotation))
    train = load_studies(train_data_file=str(tmp_path / "annotation.json"))
    assert [(s.row_id, s.images, s.report) for s in train] == [("CXR1", paths, "The lungs are clear.")]
    assert load_studies(train_data_file=str(tmp_path / "annotation.json"), split="validation")[0].row_id == "CXR2"


def test_mimic_cxr_jpg_layout_with_reports_sections_and_views(tmp_path):
    study_dir = tmp_path / "files" / "p10" / "p10000032" / "s50414267"
    study_dir.mkdir(parents=True)
    png(study_dir / "lat.jpg")
    png(study_dir / "front.jpg")
    (tmp_path / "mimic-cxr-2.0.0-split.csv").write_text(
        "dicom_id,study_id,subject_id,split\nlat,50414267,10000032,train\nfront,50414267,10000032,train\nother,5,10000033,test\n")
    (tmp_path / "mimic-cxr-2.0.0-metadata.csv").write_text("dicom_id,ViewPosition\nlat,LATERAL\nfront,PA\nother,AP\n")
    reports = tmp_path / "reports"
    (reports / "files" / "p10" / "p10000032").mkdir(parents=True)
    (reports / "files" / "p10" / "p10000032" / "s50414267.txt").write_text(
        "FINAL REPORT\n INDICATION: ___M with cough.\n FINDINGS: Small left effusion.\n IMPRESSION: Effusion.")
    (study,) = load_studies(train_data_dir=str(tmp_path), reports_dir=str(reports))
    assert study.row_id == "s50414267"
    assert [i.rsplit("/", 1)[1] for i in study.images] == ["front.jpg", "lat.jpg"]  # frontal first
    assert study.indication == "M with cough."
    dataset = ReportStudyDataset([study], "findings", max_images=2)
    assert dataset[0]["report"] == "Small left effusion." and len(dataset[0]["images"]) == 2


def test_study_dataset_quarantines_missing_images_and_empty_reports(tmp_path):
    good = png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"file_name": "a.png", "text": "FINDINGS: Clear lungs.", "indication": "Cough."},
        {"file_name": "gone.png", "text": "FINDINGS: Clear lungs."},
        {"file_name": "a.png", "text": "IMPRESSION: ___"}]))
    dataset = ReportStudyDataset(load_studies(train_data_dir=str(tmp_path)), "findings")
    assert len(dataset) == 1 and dataset[0]["indication"] == "Cough." and dataset[0]["images"][0].mode == "RGB"
    assert [(r.row_id, r.reason.split(" (")[0]) for r in dataset.quarantine.rows] == [
        ("metadata.jsonl:2", "image file not found"), ("metadata.jsonl:3", "empty report")]
    assert good


@each_family
def test_labels_cover_report_tokens_only(family, vlm, tmp_path):
    model, processor, fam = vlm(family)
    eos = end_token_id(model)
    collator = ReportCollator(processor, fam, "Describe the X-ray.", max_length=512, eos_token_id=eos)
    short, long_ = png(tmp_path / "a.png"), png(tmp_path / "b.png", 1)
    batch = collator([study([short], "Normal.", row_id="s1"), study([long_], REPORT, indication="Fever.", row_id="s2")])
    labels, ids = batch["labels"], batch["input_ids"]
    for row in range(2):
        supervised = labels[row] != IGNORE_INDEX
        assert torch.equal(labels[row][supervised], ids[row][supervised])
        assert labels[row][supervised][-1] == eos
        text = processor.tokenizer.decode(labels[row][supervised][:-1])
        assert text == answer_prefix(processor, fam) + ["Normal.", REPORT][row]
        first = int(supervised.nonzero()[0])
        assert (~supervised[:first]).all() and batch["attention_mask"][row][: first].sum() > 0  # prompt: attended, not learned
    image_token = getattr(processor, "image_token_id", None) or processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert (labels[ids == image_token] == IGNORE_INDEX).all()
    assert (labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all()  # padding
    if "token_type_ids" in batch:  # PaliGemma: the suffix is causal, type 1; Gemma 3: report tokens are text, type 0 (1 = image)
        assert (batch["token_type_ids"][labels != IGNORE_INDEX] == fam.report_token_type_id).all()
    inputs = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    loss = model(**inputs).loss
    assert torch.isfinite(loss)
    assert report_token_loss(model, inputs).item() == pytest.approx(loss.item(), rel=1e-5)  # logits for the report tokens only


@pytest.mark.parametrize("family", [name for name, family in VLM_FAMILIES.items() if family.has_chat_template])
def test_prompts_tokenize_as_transformers_own_chat_template(family, vlm, tmp_path):
    """The ids transformers gives (`apply_chat_template(tokenize=True)`): one BOS where the template writes it itself (Gemma 3), not two."""
    _, processor, fam = vlm(family)
    image = Image.open(png(tmp_path / "a.png")).convert("RGB")
    ours = encode_prompts(processor, fam, ["Describe the X-ray."], [[image]])
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe the X-ray."}]}]
    theirs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    bos = processor.tokenizer.bos_token_id
    assert bos is None or int((ours["input_ids"] == bos).sum()) <= 1


@each_family
def test_only_report_text_is_cut_never_image_tokens(family, vlm, tmp_path):
    model, processor, fam = vlm(family)
    eos = end_token_id(model)
    image = png(tmp_path / "a.png")
    unlimited = ReportCollator(processor, fam, "Describe.", max_length=4096, eos_token_id=eos)([study([image], REPORT)])
    prompt_length = int((unlimited["labels"][0] == IGNORE_INDEX).sum())
    cut = ReportCollator(processor, fam, "Describe.", max_length=prompt_length + 12, eos_token_id=eos)([study([image], REPORT)])
    assert cut["truncated_rows"] == ["s1"] and unlimited["truncated_rows"] == []
    assert torch.equal(cut["input_ids"][0][:prompt_length], unlimited["input_ids"][0][:prompt_length])  # image tokens intact
    kept = processor.tokenizer.decode(cut["labels"][0][cut["labels"][0] != IGNORE_INDEX][:-1]).strip()
    assert kept == "The heart is enlarged."  # whole sentences only
    with pytest.raises(ValueError, match="Raise --max_length"):
        ReportCollator(processor, fam, "Describe.", max_length=prompt_length - 5, eos_token_id=eos)([study([image], REPORT)])


def test_several_images_in_one_study_and_bad_rows_are_carried(vlm, tmp_path):
    model, processor, fam = vlm("llava")
    collator = ReportCollator(processor, fam, "Describe.", max_length=512, eos_token_id=end_token_id(model))
    two = study([png(tmp_path / "f.png"), png(tmp_path / "l.png", 1)])
    from medfm.data.pairs import BadRow

    batch = collator([two, {"bad_row": BadRow("s9", "x.png", "cannot decode image")}])
    assert batch["num_examples"] == 1 and [r.row_id for r in batch["bad_rows"]] == ["s9"]
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 2 * model.config.image_seq_length


def test_dicom_studies_read_like_training_data(tmp_path):
    write_dicom(tmp_path / "m1.dcm", np.tile(np.arange(40) * 100, (30, 1)), "MONOCHROME1")
    (tmp_path / "metadata.csv").write_text("file_name,text\nm1.dcm,FINDINGS: Clear.\n")
    (item,) = ReportStudyDataset(load_studies(train_data_dir=str(tmp_path)), "findings")
    pixels = np.asarray(item["images"][0])
    assert pixels.shape == (30, 40, 3) and pixels[0, 0, 0] > pixels[0, -1, 0]  # MONOCHROME1 inverted


def test_report_command_names_a_missing_adapter_in_one_line(tmp_path):
    from medfm.cli import main as medfm

    with pytest.raises(SystemExit, match=r"medfm report: error: Adapter folder .*none not found"):
        medfm(["report", "--adapter", str(tmp_path / "none"), "--image", str(png(tmp_path / "a.png"))])
