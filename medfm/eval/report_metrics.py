"""Metrics for generated reports: NLG (pycocoevalcap), clinical efficacy (CheXpert-label F1), bootstrap 95% CIs."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.classification import multilabel_f1_score
from torchmetrics.functional.text import bleu_score, rouge_score
from tqdm.auto import tqdm

from ..data.phantom import CHEXPERT_LABELS
from .clinical import METRICS, clinical_scores, require
from .labeler import label_reports

FIVE_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
ID_KEYS = ("id", "study_id", "row_id", "dicom_id", "file_name")
TEXT_KEYS = ("report", "text", "generated", "prediction", "reference", "findings", "impression")


def quick_report_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU-4 and mean ROUGE-L F1 on lower-cased text: cheap enough to run during training."""
    predictions = [p.lower() for p in predictions]
    references = [r.lower() for r in references]
    bleu = bleu_score(predictions, [[r] for r in references], n_gram=4)
    rouge = rouge_score(predictions, references, rouge_keys="rougeL")["rougeL_fmeasure"]
    return {"bleu4": float(bleu), "rougeL": float(rouge)}


# ------------------------------------------------------------------------------------------------ reading
def read_reports(path: str | Path) -> dict[str, str] | list[str]:
    """Reports from JSONL/CSV (an id column and a text column) or .txt (one per line): id -> text, or a list without ids."""
    path = Path(path)
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"{path}: use .jsonl, .csv or .txt")
    if not rows:
        raise ValueError(f"{path}: no reports")
    text_key = next((k for k in TEXT_KEYS if k in rows[0]), None)
    if text_key is None:
        raise ValueError(f"{path}: no report column; expected one of {TEXT_KEYS}, found {sorted(rows[0])}")
    id_key = next((k for k in ID_KEYS if k in rows[0]), None)
    texts = [str(row.get(text_key) or "") for row in rows]
    return {str(row[id_key]): text for row, text in zip(rows, texts)} if id_key else texts


def pair_reports(references, predictions) -> tuple[list[str], list[str], list[str]]:
    """(ids, references, predictions) matched by id when both files have ids, else by order."""
    if isinstance(references, dict) and isinstance(predictions, dict):
        missing = [k for k in references if k not in predictions]
        if missing:
            raise ValueError(f"{len(missing)} references have no prediction (first: {missing[:3]})")
        ids = list(references)
        return ids, [references[i] for i in ids], [predictions[i] for i in ids]
    references, predictions = list(_values(references)), list(_values(predictions))
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions, and no shared id column to match them")
    return [str(i) for i in range(len(references))], references, predictions


def _values(reports):
    return reports.values() if isinstance(reports, dict) else reports


# ------------------------------------------------------------------------------------------------ NLG metrics
def _simple_tokenize(text: str) -> str:
    """Lower-case, punctuation split: used only when Java (for the PTB tokenizer) is missing, and said so."""
    return " ".join(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower()))


def nlg_scores(references: list[str], predictions: list[str]) -> tuple[dict[str, float], dict[str, np.ndarray], dict]:
    """pycocoevalcap BLEU-1..4, METEOR, ROUGE-L, CIDEr: (corpus scores, per-report scores, notes)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    java = shutil.which("java") is not None
    gts = {str(i): [{"caption": r}] for i, r in enumerate(references)}
    res = {str(i): [{"caption": p}] for i, p in enumerate(predictions)}
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    else:
        gts = {k: [_simple_tokenize(v[0]["caption"])] for k, v in gts.items()}
        res = {k: [_simple_tokenize(v[0]["caption"])] for k, v in res.items()}
    res = {k: v if v and v[0] else ["<empty>"] for k, v in res.items()}  # pycocoevalcap rejects empty hypotheses
    notes = {"tokenizer": "pycocoevalcap PTBTokenizer" if java else "lower-case word split (Java missing: PTBTokenizer unavailable)",
             "unavailable": {}}
    corpus, per_report = {}, {}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        corpus[f"bleu{n + 1}"], per_report[f"bleu{n + 1}"] = float(bleu[n]), np.asarray(bleu_each[n])
    for name, scorer in (("rougeL", Rouge()), ("cider", Cider())):
        value, each = scorer.compute_score(gts, res)
        corpus[name], per_report[name] = float(value), np.asarray(each)
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        value, each = Meteor().compute_score(gts, res)
        corpus["meteor"], per_report["meteor"] = float(value), np.asarray(each)
    else:
        notes["unavailable"]["meteor"] = "needs Java (pycocoevalcap runs METEOR 1.5 in a JVM); install a JRE"
    return corpus, per_report, notes


def _corpus_bleu(gts_res: tuple[dict, dict], index: np.ndarray) -> list[float]:
    from pycocoevalcap.bleu.bleu import Bleu

    gts, res = gts_res
    keys = list(gts)
    sample_gts = {str(j): gts[keys[i]] for j, i in enumerate(index)}
    sample_res = {str(j): res[keys[i]] for j, i in enumerate(index)}
    return Bleu(4).compute_score(sample_gts, sample_res, verbose=0)[0]


def bertscore_f1(references: list[str], predictions: list[str], model_path: str, num_layers: int | None = None) -> np.ndarray:
    """Per-report BERTScore F1 (torchmetrics) with a local model folder; no download at run time."""
    from torchmetrics.functional.text.bert import bert_score
    from transformers import AutoConfig

    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"--bertscore_model {model_path}: not a local model folder (BERTScore never downloads)")
    num_layers = num_layers or AutoConfig.from_pretrained(model_path).num_hidden_layers
    return bert_score(predictions, references, model_name_or_path=model_path, num_layers=num_layers)["f1"].numpy()


# ------------------------------------------------------------------------------------------------ clinical efficacy
def label_matrix(labels: list[dict], uncertain: str) -> torch.Tensor:
    """Reports x 14 binary matrix; uncertain (-1) counts as positive or negative as `uncertain` says."""
    positive = {1.0} | ({-1.0} if uncertain == "positive" else set())
    return torch.tensor([[int(row[name] in positive) for name in CHEXPERT_LABELS] for row in labels])


def chexpert_f1(reference: torch.Tensor, predicted: torch.Tensor, prefix: str = "chexpert") -> dict[str, float]:
    """Micro and macro F1 over the 14 observations and over the usual 5 (a label absent from both counts 0 in the macro
    mean, as scikit-learn's classification_report that f1chexbert / RadEval use)."""
    five = [CHEXPERT_LABELS.index(name) for name in FIVE_LABELS]
    scores = {}
    for suffix, columns in (("14", list(range(len(CHEXPERT_LABELS)))), ("5", five)):
        for average in ("micro", "macro"):
            value = multilabel_f1_score(predicted[:, columns], reference[:, columns], num_labels=len(columns), average=average, zero_division=0)
            scores[f"{prefix}_f1_{average}_{suffix}"] = float(value)
    return scores


# ------------------------------------------------------------------------------------------------ the harness
def evaluate_reports(references: list[str], predictions: list[str], bootstrap_samples: int = 1000, uncertain: str = "negative",
                     seed: int = 0, bertscore_model: str | None = None, clinical: tuple[str, ...] = (), metrics_dir: str | None = None) -> dict:
    """Every metric with a bootstrap 95% CI over reports (resampled with replacement, `seed` fixed); `clinical` adds the
    clinical ones of medfm.eval.clinical (CheXbert, RadGraph, GREEN, RaTEScore, RadCliQ), weights from `metrics_dir` or the caches."""
    if uncertain not in ("positive", "negative"):
        raise ValueError("uncertain must be 'positive' or 'negative'")
    for name in clinical:  # fail before any work when a package or its weights are missing
        require(name, metrics_dir)
    bertscores = bertscore_f1(references, predictions, bertscore_model) if bertscore_model else None
    corpus, per_report, notes = nlg_scores(references, predictions)
    if bertscores is not None:
        per_report["bertscore_f1"], corpus["bertscore_f1"] = bertscores, float(bertscores.mean())
        notes["bertscore_model"] = str(bertscore_model)
    else:
        notes["unavailable"]["bertscore_f1"] = "pass --bertscore_model with a local model folder"
    reference_labels, predicted_labels = label_reports(references), label_reports(predictions)
    ref_matrix, pred_matrix = label_matrix(reference_labels, uncertain), label_matrix(predicted_labels, uncertain)
    corpus.update(chexpert_f1(ref_matrix, pred_matrix))
    label_sets = {"chexpert": (ref_matrix, pred_matrix)}
    clinical_labels = {}
    for name in clinical:
        scores = clinical_scores(name, predictions, references, metrics_dir)
        per_report |= {column: values for column, values in scores.items() if values.ndim == 1}
        corpus |= {column: float(np.nanmean(values)) for column, values in scores.items() if values.ndim == 1}
        if f"{name}_reference_labels" in scores:  # a labeler (CheXbert): F1 micro/macro over 14 and 5 like the rule-based labels
            label_sets[name] = torch.from_numpy(scores[f"{name}_reference_labels"]), torch.from_numpy(scores[f"{name}_predicted_labels"])
            corpus.update(chexpert_f1(*label_sets[name], prefix=name))
            clinical_labels |= {column: values for column, values in scores.items() if values.ndim == 2}
    if clinical:
        notes["clinical_metrics"] = {name: {"package": METRICS[name].package,
                                            "weights": [w.repo_id + "".join(f"/{f}" for f in w.files) for w in METRICS[name].weights],
                                            "higher_is_better": METRICS[name].higher_is_better, "policy": METRICS[name].policy} for name in clinical}

    gts = {str(i): [_simple_tokenize(r) or "<empty>"] for i, r in enumerate(references)}
    res = {str(i): [_simple_tokenize(p) or "<empty>"] for i, p in enumerate(predictions)}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {name: [] for name in corpus}
    for _ in tqdm(range(bootstrap_samples), desc="Bootstrap", unit="resample", disable=bootstrap_samples < 50):
        index = rng.integers(0, len(references), len(references))
        for name, scores in per_report.items():
            if not name.startswith("bleu"):
                samples[name].append(float(np.nanmean(scores[index])))
        for n, value in enumerate(_corpus_bleu((gts, res), index)):
            samples[f"bleu{n + 1}"].append(float(value))
        for prefix, (reference, predicted) in label_sets.items():
            for name, value in chexpert_f1(reference[index], predicted[index], prefix=prefix).items():
                samples[name].append(value)
    metrics = {name: {"value": value, "ci95": [float(np.percentile(samples[name], 2.5)), float(np.percentile(samples[name], 97.5))]
                      if bootstrap_samples else None} for name, value in corpus.items()}
    notes.update({
        "num_reports": len(references),
        "chexpert_policy": f"rule-based medfm labeler; uncertain (-1) counted as {uncertain}; blank and 0 as negative",
        "bootstrap": f"{bootstrap_samples} resamples of reports, percentile 95% CI, seed {seed}; BLEU CIs use the word-split "
                     "tokenizer, METEOR/ROUGE-L/CIDEr CIs resample per-report scores (CIDEr IDF from the full set)",
    })
    return {"metrics": metrics, "notes": notes, "labels": {"references": reference_labels, "predictions": predicted_labels},
            "per_report": {name: [None if np.isnan(v) else float(v) for v in scores] for name, scores in per_report.items()},
            "clinical_labels": {name: [dict(zip(CHEXPERT_LABELS, map(int, row))) for row in matrix] for name, matrix in clinical_labels.items()}}


def write_report_evaluation(result: dict, ids: list[str], references: list[str], predictions: list[str], output_dir: str | Path) -> Path:
    """metrics.json (values, CIs, notes) and per_report.jsonl (texts and labels) in `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps({"metrics": result["metrics"], "notes": result["notes"]}, indent=2))
    with open(output_dir / "per_report.jsonl", "w", encoding="utf-8") as f:
        for i, (ref, pred) in enumerate(zip(references, predictions)):
            f.write(json.dumps({"id": ids[i], "reference": ref, "prediction": pred, "reference_labels": result["labels"]["references"][i],
                                "predicted_labels": result["labels"]["predictions"][i],
                                "scores": {name: values[i] for name, values in result.get("per_report", {}).items()},
                                **{name: labels[i] for name, labels in result.get("clinical_labels", {}).items()}}) + "\n")
    return output_dir / "metrics.json"


def format_metrics(result: dict) -> str:
    lines = [f"{'metric':<24} {'value':>8}   95% CI"]
    for name, entry in result["metrics"].items():
        ci = entry["ci95"]
        lines.append(f"{name:<24} {entry['value']:>8.4f}   " + (f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"))
    for name, reason in result["notes"]["unavailable"].items():
        lines.append(f"{name:<24} {'n/a':>8}   {reason}")
    lines.append(f"CheXpert F1 policy: {result['notes']['chexpert_policy']}")
    lines.append(f"Tokenizer: {result['notes']['tokenizer']}")
    for name, entry in result["notes"].get("clinical_metrics", {}).items():
        lines.append(f"{name}: {entry['package']}{'' if entry['higher_is_better'] else ' (lower is better)'}; {entry['policy']}".rstrip("; "))
    return "\n".join(lines)
