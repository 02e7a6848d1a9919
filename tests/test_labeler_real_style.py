"""The labeler on real-style radiology sentences (IU X-Ray / MIMIC-CXR wording, hand-written, no patient data).

tests/data/labeler_sentences.jsonl was used while writing the rules; tests/data/labeler_sentences_heldout.jsonl was
written before the rules were changed and only scored at the end, as was labeler_sentences_heldout2.jsonl (written
later). Each row lists the expected label of every
observation the text mentions; unlisted observations are expected not mentioned (None), and "No Finding", when not
listed, is 1 unless a listed pathology is positive or uncertain.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sklearn.metrics import f1_score

from medfm.data.phantom import CHEXPERT_LABELS
from medfm.eval.labeler import PATHOLOGIES, label_report

DATA = Path(__file__).parent / "data"


def load_rows(name: str) -> list[tuple[str, dict]]:
    rows = []
    for line in (DATA / name).read_text().splitlines():
        row = json.loads(line)
        expected = {label: None for label in CHEXPERT_LABELS} | {k: (None if v is None else float(v)) for k, v in row["labels"].items()}
        if "No Finding" not in row["labels"]:
            expected["No Finding"] = None if any(expected[p] in (1.0, -1.0) for p in PATHOLOGIES) else 1.0
        rows.append((row["text"], expected))
    return rows


def per_observation_f1(rows: list[tuple[str, dict]]) -> dict[str, float]:
    """Macro-F1 over the four outcomes (positive, negative, uncertain, not mentioned) of each observation."""
    predicted = [label_report(text) for text, _ in rows]
    scores = {}
    for label in CHEXPERT_LABELS:
        truth = [str(expected[label]) for _, expected in rows]
        guess = [str(labels[label]) for labels in predicted]
        scores[label] = f1_score(truth, guess, average="macro", labels=sorted(set(truth)), zero_division=0)
    return scores


DEV = load_rows("labeler_sentences.jsonl")


@pytest.mark.parametrize("text, expected", DEV, ids=[text[:50] for text, _ in DEV])
def test_real_style_sentence(text, expected):
    assert label_report(text) == expected


def test_case_and_tokenisation_do_not_change_labels():
    """Lower-cased, upper-cased and R2Gen-style tokenised reports ("the heart is normal . no effusion .") label alike."""
    for text, expected in DEV:
        tokenised = re.sub(r"\s+", " ", re.sub(r"([.,;:])", r" \1 ", text.lower()))
        for variant in (text.lower(), text.upper(), tokenised):
            assert label_report(variant) == expected, variant


@pytest.mark.parametrize("name", ["labeler_sentences_heldout.jsonl", "labeler_sentences_heldout2.jsonl"])
def test_held_out_sentences(name):
    """Scored after the rules were written (mean over observations of the four-outcome macro-F1): the first set 0.842
    before the rewrite, 0.992 after; the second, written later, 0.896 before, 0.985 when first scored (its one miss,
    "no consolidation concerning for pneumonia", was then fixed)."""
    scores = per_observation_f1(load_rows(name))
    assert sum(scores.values()) / len(scores) >= 0.97, scores
