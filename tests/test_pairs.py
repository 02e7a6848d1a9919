import json

import datasets
import numpy as np
import pytest
from PIL import Image

from medfm.data.pairs import BadRowError, ImageReportDataset, Quarantine, collate_pairs, load_pairs
from medfm.models.tokenizers import clip_tokenizer


def png(path, value=128):
    Image.fromarray(np.full((40, 50), value, dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer(num_merges=2000)


def test_imagefolder_jsonl_and_csv(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "Cardiomegaly."}) + "\n")
    pairs = load_pairs(train_data_dir=str(tmp_path))
    assert [(p.image, p.report) for p in pairs] == [(str(tmp_path / "a.png"), "Cardiomegaly.")]
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,Cardiomegaly.\n")
    assert load_pairs(train_data_dir=str(tmp_path))[0].report == "Cardiomegaly."


def test_imagefolder_without_metadata_says_what_to_add(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metadata.jsonl or metadata.csv"):
        load_pairs(train_data_dir=str(tmp_path))


def test_table_with_named_columns_and_image_root(tmp_path):
    (tmp_path / "images").mkdir()
    png(tmp_path / "images" / "x.png")
    (tmp_path / "split.csv").write_text("dicom_id,report_text\nx.png,IMPRESSION: Small left effusion.\n")
    pairs = load_pairs(train_data_file=str(tmp_path / "split.csv"), image_column="dicom_id", caption_column="report_text",
                       image_root=str(tmp_path / "images"))
    assert pairs[0].image == str(tmp_path / "images" / "x.png")
    with pytest.raises(ValueError, match="no caption column 'nope'"):
        load_pairs(train_data_file=str(tmp_path / "split.csv"), image_column="dicom_id", caption_column="nope")


def test_saved_datasets_dataset_with_image_feature(tmp_path, tokenizer):
    png(tmp_path / "a.png", 200)
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / "a.png")], "report": ["Normal chest."]}).cast_column("image", datasets.Image())
    ds.save_to_disk(tmp_path / "saved")
    pairs = load_pairs(dataset_name=str(tmp_path / "saved"))
    item = ImageReportDataset(pairs, 32, tokenizer)[0]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert item["pixel_values"].mean() > 0.5  # 200/255 -> ~0.57 in [-1, 1]


def test_bad_rows_are_quarantined_with_reasons(tmp_path, tokenizer):
    png(tmp_path / "good.png")
    (tmp_path / "cut.png").write_bytes(png(tmp_path / "tmp.png").read_bytes()[:60])
    rows = [("good.png", "Cardiomegaly."), ("missing.png", "Cardiomegaly."), ("good.png", "   XXXX  "), ("cut.png", "Effusion.")]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows))
    quarantine = Quarantine()
    dataset = ImageReportDataset(load_pairs(train_data_dir=str(tmp_path)), 32, tokenizer, quarantine=quarantine)
    assert len(dataset) == 1
    reasons = {row.row_id: row.reason for row in quarantine.rows}
    assert reasons.keys() == {"metadata.jsonl:2", "metadata.jsonl:3", "metadata.jsonl:4"}
    assert reasons["metadata.jsonl:2"] == "image file not found"
    assert reasons["metadata.jsonl:3"].startswith("empty report")
    assert "cannot decode image" in reasons["metadata.jsonl:4"]
    quarantine.write(tmp_path / "bad_rows.jsonl")
    assert len((tmp_path / "bad_rows.jsonl").read_text().splitlines()) == 3


def test_strict_stops_at_the_first_bad_row_in_order(tmp_path, tokenizer):
    png(tmp_path / "good.png")
    (tmp_path / "cut.png").write_bytes(png(tmp_path / "tmp.png").read_bytes()[:60])
    rows = [("good.png", "Cardiomegaly."), ("cut.png", "Effusion."), ("missing.png", "Cardiomegaly.")]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows))
    with pytest.raises(BadRowError, match=r"metadata.jsonl:2 \(.*cut.png\).*cannot decode"):
        ImageReportDataset(load_pairs(train_data_dir=str(tmp_path)), 32, tokenizer, quarantine=Quarantine(strict=True))


def test_an_image_that_breaks_after_the_check_is_skipped_in_the_batch(tmp_path, tokenizer):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": "Normal."}) + "\n" for f in ("a.png", "b.png")))
    dataset = ImageReportDataset(load_pairs(train_data_dir=str(tmp_path)), 32, tokenizer)
    (tmp_path / "b.png").write_bytes(b"not an image")
    batch = collate_pairs([dataset[0], dataset[1]])
    assert batch["num_examples"] == 1 and batch["pixel_values"].shape == (1, 3, 32, 32)
    assert batch["input_ids"].shape == (1, 77)
    assert [row.row_id for row in batch["bad_rows"]] == ["metadata.jsonl:2"]
