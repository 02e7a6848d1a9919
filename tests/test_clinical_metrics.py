"""Clinical report metrics through RadEval's real code paths, on tiny checkpoints in the real layout served by the local Hub.

The packages download the weights with huggingface_hub from HF_ENDPOINT (tests/hub_server.py) into per-test caches; nothing
leaves the machine (radeval's import-time nltk.download is refused and recorded).
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import huggingface_hub.hf_api
import numpy as np
import pytest
import tiny_scorers
from huggingface_hub import constants

from hub_server import LocalHub
from medfm.cli import main as medfm
from medfm.data.phantom import CHEXPERT_LABELS
from medfm.eval import clinical
from medfm.eval.report_metrics import evaluate_reports

pytestmark = pytest.mark.skipif(importlib.util.find_spec("radeval") is None, reason='the clinical metrics need pip install "medfm[clinical]"')

REFERENCES = ["No acute cardiopulmonary process.", "Small left pleural effusion.", "Moderate cardiomegaly with mild edema.",
              "Right lower lobe consolidation concerning for pneumonia.", "Large right pneumothorax.", "Left upper lobe opacity and atelectasis."]
PREDICTIONS = ["The lungs are clear.", "Large right pleural effusion.", "Cardiomegaly.", "Left upper lobe opacity.",
               "Small right pneumothorax.", "No acute cardiopulmonary process."]
ENCODER = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"  # the tiny RadGraph archives name this encoder in their config.json


@pytest.fixture(autouse=True)
def no_nltk_download(monkeypatch):
    """radeval runs nltk.download('punkt_tab') at import: refuse it as an offline nltk does, and keep the record."""
    import nltk

    calls = []
    monkeypatch.setattr(nltk, "download", lambda *args, **kwargs: calls.append(args) or False)
    return calls


@pytest.fixture
def no_java(monkeypatch):
    """pycocoevalcap's Java tokenizer and METEOR take most of a minute on a busy machine and are tested elsewhere."""
    monkeypatch.setattr(shutil, "which", lambda name: None)


@pytest.fixture
def hub(monkeypatch, tmp_path, no_java):
    """The local Hub as HF_ENDPOINT, online mode, fresh caches (Hugging Face's and RadEval's), no model kept from another test."""
    with LocalHub("hf_unused") as server:
        for key, value in {"HF_ENDPOINT": server.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", server.endpoint)  # list_repo_tree & co. took the endpoint at import
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        for kind, module in clinical.RADEVAL_CACHES.items():
            monkeypatch.setattr(clinical._import(module, kind), "CACHE_DIR", str(tmp_path / f"{kind}-cache"))
        clinical._chexbert.cache_clear()
        clinical._radeval_metric.cache_clear()
        yield server
    clinical._chexbert.cache_clear()
    clinical._radeval_metric.cache_clear()


def serve_chexbert(hub) -> None:
    bert = tiny_scorers.bert_base_uncased()
    hub.add_files("bert-base-uncased", bert)
    hub.add_files("StanfordAIMI/RRG_scorers", {"chexbert.pth": tiny_scorers.chexbert_pth(bert)})


def serve_radgraph(hub, model_type: str) -> None:
    if ENCODER not in hub.repos:
        hub.add_files(ENCODER, tiny_scorers.tiny_bert_repo())
    hub.add_files("StanfordAIMI/RRG_scorers", {f"{model_type}.tar.gz": tiny_scorers.radgraph_tarball(model_type, ENCODER)})


def download_as_told(error: str, endpoint: str) -> list[str]:
    """Run the `hf download` commands an error message gives, against the local Hub, as a user would (the real `hf` CLI)."""
    commands = [line.split(":  ", 1)[1] for line in error.splitlines() if ":  hf download " in line]
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    hf = os.path.join(os.path.dirname(sys.executable), "hf")
    for command in commands:
        subprocess.run([hf, *command.split()[1:]], check=True, env=env, capture_output=True)
    return commands


@pytest.mark.slow
def test_chexbert_f1_micro_macro_14_and_5_match_scikit_learn_on_radevals_own_labels(hub, tmp_path, no_nltk_download):
    serve_chexbert(hub)
    result = evaluate_reports(REFERENCES, PREDICTIONS, bootstrap_samples=30, clinical=("chexbert",))
    metrics = result["metrics"]

    # The same numbers straight from the package: F1CheXbert's labels, scored as its forward() does (classification_report).
    from radeval.metrics.f1chexbert import F1CheXbert
    from sklearn.metrics import classification_report

    scorer = F1CheXbert(device="cpu")
    refs, hyps = np.array(scorer.get_labels(REFERENCES)), np.array(scorer.get_labels(PREDICTIONS))
    top5 = [scorer.TARGET_NAMES.index(name) for name in scorer.TOP5]
    for suffix, columns in (("14", list(range(14))), ("5", top5)):
        report = classification_report(refs[:, columns], hyps[:, columns], output_dict=True, zero_division=0)
        for average in ("micro", "macro"):
            assert metrics[f"chexbert_f1_{average}_{suffix}"]["value"] == pytest.approx(report[f"{average} avg"]["f1-score"], abs=1e-6)  # torchmetrics: float32
    assert 0 < metrics["chexbert_f1_micro_14"]["value"] < 1  # the tiny heads give labels that differ between reports
    for name in ("chexbert_f1_micro_14", "chexbert_f1_macro_5", "chexbert_example_f1_14"):
        low, high = metrics[name]["ci95"]
        assert 0 <= low <= high <= 1
    assert result["clinical_labels"]["chexbert_reference_labels"][1] == dict(zip(scorer.TARGET_NAMES, map(int, refs[1])))
    assert set(result["clinical_labels"]["chexbert_reference_labels"][1]) == set(CHEXPERT_LABELS)
    assert "uncertain counted as positive" in result["notes"]["clinical_metrics"]["chexbert"]["policy"]
    assert os.listdir(tmp_path / "chexbert-cache") and no_nltk_download == [("punkt_tab",)] * len(no_nltk_download)

    # Per-report scores for a reward: one float per report; identical reports agree on every label.
    assert clinical.per_report_scores("chexbert", REFERENCES, REFERENCES) == [1.0] * len(REFERENCES)
    rewards = clinical.per_report_scores("chexbert", PREDICTIONS, REFERENCES)
    assert rewards == pytest.approx(result["per_report"]["chexbert_example_f1_14"]) and all(isinstance(r, float) for r in rewards)


@pytest.mark.slow
def test_missing_weights_name_the_commands_that_fill_metrics_dir_then_it_runs_offline(hub, tmp_path, monkeypatch, capsys):
    serve_chexbert(hub)
    online = evaluate_reports(REFERENCES, PREDICTIONS, bootstrap_samples=0, clinical=("chexbert",))["metrics"]["chexbert_f1_micro_14"]["value"]
    clinical._chexbert.cache_clear()
    folder = tmp_path / "metric-weights"
    with pytest.raises(clinical.MissingMetricWeights) as missing:
        clinical.clinical_scores("chexbert", PREDICTIONS, REFERENCES, metrics_dir=folder)
    error = str(missing.value)
    assert "radeval (F1CheXbert)" in error and "StanfordAIMI/RRG_scorers chexbert.pth" in error and "bert-base-uncased (whole repo)" in error
    assert download_as_told(error, hub.endpoint) == [f"hf download StanfordAIMI/RRG_scorers chexbert.pth --cache-dir {folder}",
                                                     f"hf download bert-base-uncased --cache-dir {folder}"]
    hub.repos.clear()  # from here on the Hub has nothing: the folder alone must do, and no request may reach the Hub
    requests = len(hub.authorizations)
    (tmp_path / "refs.jsonl").write_text("".join(f'{{"id": "s{i}", "report": "{r}"}}\n' for i, r in enumerate(REFERENCES)))
    (tmp_path / "preds.jsonl").write_text("".join(f'{{"id": "s{i}", "report": "{p}"}}\n' for i, p in enumerate(PREDICTIONS)))
    medfm(["eval", "reports", "--references", str(tmp_path / "refs.jsonl"), "--predictions", str(tmp_path / "preds.jsonl"),
           "--output_dir", str(tmp_path / "out"), "--bootstrap", "10", "--metrics", "chexbert", "--metrics_dir", str(folder)])
    import json

    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["metrics"]["chexbert_f1_micro_14"]["value"] == online and "chexbert" in saved["notes"]["clinical_metrics"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "per_report.jsonl").read_text().splitlines()]
    assert set(rows[0]["chexbert_predicted_labels"]) == set(CHEXPERT_LABELS) and 0 <= rows[0]["scores"]["chexbert_example_f1_14"] <= 1
    assert "bleu4" in rows[0]["scores"] and "chexbert_f1_macro_5" in capsys.readouterr().out
    assert len(hub.authorizations) == requests and constants.HF_HUB_OFFLINE is False  # offline inside, online mode restored after


@pytest.mark.slow
def test_radgraph_runs_on_a_tiny_dygie_archive(hub, tmp_path):
    serve_radgraph(hub, "radgraph-xl")
    result = evaluate_reports(REFERENCES, PREDICTIONS, bootstrap_samples=20, clinical=("radgraph",))
    for level in ("simple", "partial", "complete"):
        entry = result["metrics"][f"radgraph_{level}"]
        assert 0 <= entry["ci95"][0] <= entry["value"] <= entry["ci95"][1] <= 1 and len(result["per_report"][f"radgraph_{level}"]) == 6
    assert (tmp_path / "radgraph-cache" / "radgraph-xl" / "weights.th").is_file()  # RadGraph unpacked the served archive
    same = clinical.per_report_scores("radgraph", REFERENCES, REFERENCES)
    assert all(score in (0.0, 1.0) for score in same) and 1.0 in same  # identical reports: 1, or 0 where the model finds no entity

    # --metrics_dir: the archive first; once it is there, the encoder its config.json names; then it runs with the Hub gone.
    folder, commands = tmp_path / "metric-weights", []
    clinical._radeval_metric.cache_clear()
    for _ in range(2):
        with pytest.raises(clinical.MissingMetricWeights) as missing:
            clinical.per_report_scores("radgraph", PREDICTIONS, REFERENCES, metrics_dir=folder)
        commands += download_as_told(str(missing.value), hub.endpoint)
    hub.repos.clear()
    offline = clinical.per_report_scores("radgraph", PREDICTIONS, REFERENCES, metrics_dir=folder)
    assert commands == [f"hf download StanfordAIMI/RRG_scorers radgraph-xl.tar.gz --cache-dir {folder}", f"hf download {ENCODER} --cache-dir {folder}"]
    assert offline == pytest.approx(result["per_report"]["radgraph_partial"]) and (folder / "radgraph-xl" / "weights.th").is_file()


def test_each_metric_offline_without_weights_names_package_repos_and_commands(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for name, metric in clinical.METRICS.items():
        with pytest.raises(clinical.MissingMetricWeights) as missing:
            clinical.require(name, metrics_dir=tmp_path)
        error = str(missing.value)
        assert f"--metrics {name} ({metric.package})" in error
        for weights in metric.weights:
            assert weights.download_command(str(tmp_path)) in error
    assert constants.HF_HUB_OFFLINE is True


def test_without_radeval_the_error_names_the_package_and_the_install(monkeypatch, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "radeval" else find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r'needs the RadEval package: pip install "medfm\[clinical\]"'):
        clinical.per_report_scores("green", PREDICTIONS, REFERENCES)
    (tmp_path / "r.txt").write_text("\n".join(REFERENCES))
    with pytest.raises(SystemExit, match="medfm eval reports: error: --metrics radgraph needs the RadEval package"):
        medfm(["eval", "reports", "--references", str(tmp_path / "r.txt"), "--predictions", str(tmp_path / "r.txt"), "--output_dir",
               str(tmp_path / "out"), "--metrics", "radgraph"])
    with pytest.raises(ValueError, match="Unknown clinical metric 'bleu'"):
        clinical.per_report_scores("bleu", PREDICTIONS, REFERENCES)


@pytest.mark.slow
def test_radcliq_combines_radgraph_bertscore_chexbert_embeddings_and_bleu(hub):
    serve_chexbert(hub)
    serve_radgraph(hub, "radgraph")
    hub.add_files("distilroberta-base", tiny_scorers.distilroberta_base())
    scores = clinical.per_report_scores("radcliq", PREDICTIONS[:3], REFERENCES[:3])
    identical = clinical.per_report_scores("radcliq", REFERENCES[:3], REFERENCES[:3])
    # Identical reports score 1 on BERTScore (rescaled), the CheXbert-embedding cosine and BLEU-2; RadGraph's part is
    # (entity F1 + relation F1) / 2, where a side with no relation scores 0. RadCliQ-v1 is RadEval's fixed linear model on them.
    composite = clinical._radeval_metric("radcliq")._scorer
    parts = composite._compute_sub_metrics(REFERENCES[:3], REFERENCES[:3])
    assert np.allclose(np.column_stack([parts[k] for k in ("bertscore", "semb_score", "bleu_score")]), 1.0, atol=1e-4)
    assert set(np.round(parts["radgraph"], 6)) <= {0.0, 0.5, 1.0}
    expected = composite.scaler.transform(composite._build_matrix(parts)) @ composite.coefs[:4] + composite.coefs[4]
    assert identical == pytest.approx(expected.tolist(), abs=1e-4) and len(scores) == 3 and all(np.isfinite(scores))
    assert not clinical.METRICS["radcliq"].higher_is_better


@pytest.mark.slow
def test_green_runs_its_judge_on_a_tiny_causal_lm(hub):
    from radeval.metrics.green_score.utils import make_prompt

    hub.add_files("StanfordAIMI/GREEN-radllama2-7b", tiny_scorers.tiny_llama_judge([make_prompt(r, p) for r, p in zip(REFERENCES, PREDICTIONS)]))
    result = evaluate_reports(REFERENCES[:3], PREDICTIONS[:3], bootstrap_samples=10, clinical=("green",))
    judge = clinical._radeval_metric("green")._scorer
    assert len(judge.completions) == 3 and all(isinstance(text, str) for text in judge.completions)  # the judge generated for every pair
    # A random judge writes no "[Matched Findings]: N." line, which GREEN scores 0: the package's own parse, read back per report.
    assert result["per_report"]["green"] == [float(judge.compute_green(text)) for text in judge.completions]
    assert result["metrics"]["green"]["value"] == pytest.approx(np.mean(result["per_report"]["green"]))


@pytest.mark.slow
def test_ratescore_runs_ner_and_synonym_encoder_on_tiny_models(hub):
    try:
        clinical._import("radeval.metrics.RaTEScore.scorer", "ratescore")
    except ImportError as err:  # Python < 3.12 with medspacy's spacy<3.8 pin: the error says to pip install "spacy>=3.8"
        assert 'pip install "spacy>=3.8"' in str(err)
        pytest.skip(str(err))
    hub.add_files("Angelakeke/RaTE-NER-Deberta", tiny_scorers.rate_ner_deberta())
    hub.add_files("FremyCompany/BioLORD-2023-C", tiny_scorers.biolord_mpnet())
    scores = clinical.per_report_scores("ratescore", PREDICTIONS, REFERENCES)
    identical = clinical.per_report_scores("ratescore", REFERENCES, REFERENCES)
    _, _, entities = clinical._radeval_metric("ratescore")._scorer.compute_score(REFERENCES, REFERENCES)
    # RaTEScore gives 0.5 when a report has no entity, else the F1 of matched entity embeddings: 1 for identical reports.
    assert identical == pytest.approx([1.0 if found else 0.5 for found in entities], abs=1e-5) and any(entities)
    assert len(scores) == 6 and all(0 <= s <= 1 for s in scores)
