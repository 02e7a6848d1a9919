import json

import numpy as np

from medfm.cli import main as medfm
from medfm.data.phantom import CHEXPERT_LABELS, make_phantom, sample_case


def test_phantoms_are_deterministic_by_seed():
    a, record_a = make_phantom(7, 64)
    b, record_b = make_phantom(7, 64)
    c, _ = make_phantom(8, 64)
    assert np.array_equal(a, b) and record_a == record_b
    assert not np.array_equal(a, c)


def test_labels_follow_the_report():
    for seed in range(200):
        case = sample_case(seed)
        _, record = make_phantom(seed, 32)
        report = record["text"].lower()
        assert set(CHEXPERT_LABELS) <= set(record)
        if record["Pneumothorax"] == 0:
            assert "pneumothorax" not in report or "no " in report
        if record["Pneumothorax"] == 1:
            assert f"{case.pneumothorax['side']}" in report and "pneumothorax" in report
        if record["Pleural Effusion"] == 1:
            assert "effusion" in record["impression"].lower()
        if record["No Finding"] == 1:
            assert not any(record[k] == 1 for k in ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Consolidation", "Lung Lesion"))


def test_findings_change_the_picture_where_they_should():
    healthy = next(s for s in range(100) if sample_case(s).is_normal and not sample_case(s).devices)
    case = sample_case(healthy)
    from medfm.data.phantom import render_phantom

    case.cardiomegaly = True
    big_heart = render_phantom(case, 128)
    case.cardiomegaly = False
    normal = render_phantom(case, 128)
    lower_middle = (slice(70, 100), slice(50, 90))
    assert big_heart[lower_middle].mean() > normal[lower_middle].mean() + 0.02


def test_population_has_every_finding_and_varied_language():
    records = [make_phantom(s, 32)[1] for s in range(150)]
    for label in ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Consolidation", "Lung Lesion", "Support Devices", "No Finding"):
        assert any(r[label] == 1 for r in records), label
    assert any(r["Pleural Effusion"] == -1 or r["Consolidation"] == -1 or r["Pneumothorax"] == -1 for r in records)
    assert len({r["impression"] for r in records}) > 40
    assert any("left" in r["text"] for r in records) and any("right" in r["text"] for r in records)


def test_cli_writes_an_imagefolder(tmp_path):
    medfm(["phantom", "--output_dir", str(tmp_path), "--num_images", "3", "--seed", "1", "--size", "64"])
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert all((tmp_path / r["file_name"]).is_file() and r["text"].startswith("FINDINGS:") for r in rows)
