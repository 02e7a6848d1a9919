"""A rule-based labeler for the 14 CheXpert observations: positive (1), negative (0), uncertain (-1), not mentioned (None).

Hand-written because no maintained pip package does it offline (the CheXpert labeler needs NegBio + a
parser; CheXbert needs a model download). It follows their logic: find mentions per sentence, decide each
mention's polarity from negation / uncertainty cues in its clause, then aggregate per report
(positive > uncertain > negative). "No Finding" is 1 when no pathology is positive or uncertain.
"""

from __future__ import annotations

import re

from ..data.phantom import CHEXPERT_LABELS
from ..data.reports import split_sentences

MENTIONS = {
    "Enlarged Cardiomediastinum": r"(?:widen\w*|enlarg\w*|prominen\w*) (?:of the )?(?:cardio)?mediast\w*|mediastinal widening"
                                  r"|(?:cardio)?mediastin\w* (?:silhouette |contours? )?(?:is |are |appears? )?(?:\w+ )?(?:widened|enlarged|prominent)"
                                  r"|cardiomediastinal (?:silhouette|contours?)",
    "Cardiomegaly": r"cardiomegaly|enlarg\w* (?:of )?(?:the )?(?:heart|cardiac silhouette)|heart size|(?:heart|cardiac silhouette) (?:is |appears )?"
                    r"(?:\w+ )?(?:enlarged|large)|enlarged heart|cardiac enlargement|cardiac (?:size|contour|shadow)"
                    r"|cardiomediastinal (?:silhouette|contours?)",
    "Lung Opacity": r"opacit\w*|infiltrat\w*|air ?space (?:disease|opacit\w*)|haz(?:y|iness)|densit(?:y|ies)",
    "Lung Lesion": r"nodul\w*|mass(?:es)?\b|lesions?|tumou?rs?|neoplasm\w*|carcinoma",
    "Edema": r"edema|oedema|(?:vascular|pulmonary) congestion|fluid overload|vascular engorgement",
    "Consolidation": r"consolidat\w*",
    "Pneumonia": r"pneumoni\w*|infectio\w*|infectious process",
    "Atelectasis": r"atelecta\w*|collapse",
    "Pneumothorax": r"pneumothora\w*|\bptx\b",
    "Pleural Effusion": r"(?<!pericardial )effusions?|pleural fluid",
    "Pleural Other": r"pleural (?:thickening|scarring|plaques?)|fibrothorax|pleural-parenchymal scarring",
    "Fracture": r"fractur\w*",
    "Support Devices": r"(?:endotracheal|et|nasogastric|ng|enteric|orogastric|og|feeding|chest|tracheostomy|dobhoff) tubes?|tubes? and lines?"
                       r"|lines? and tubes?|catheters?|central (?:venous )?line|picc(?: line)?|pacemaker|pacer|pacing (?:device|leads?|wires?)"
                       r"|defibrillator|\baicd\b|swan[- ]ganz|port-?a-?cath|stents?|sternotomy wires|drains?|support devices?",
}
MENTION_PATTERNS = {label: re.compile(rf"\b(?:{pattern})", re.I) for label, pattern in MENTIONS.items()}
PATHOLOGIES = [label for label in CHEXPERT_LABELS if label not in ("No Finding", "Support Devices")]

# Cues, matched on lower-cased text. Post cues follow the mention within its clause.
UNCERTAIN_POST = re.compile(r"can ?not be (?:excluded|ruled out)|not (?:be )?excluded|(?:is|are) not ruled out"
                            r"|(?:is|are) (?:suspected|possible|questionable|likely|probable|favored)|\?")
NEGATION_PRE = re.compile(
    r"\b(?:no|without|negative for|free of|clear of|absence of|resolution of|resolved|rather than|not|normal)\b|\bno longer\b")
NEGATION_POST = re.compile(
    r"\b(?:(?:is|are|has|have) (?:been )?(?:resolved|cleared|removed|absent)|not (?:seen|identified|present|demonstrated|visualized|appreciated)"
    r"|(?:is|are) (?:not|no longer) (?:seen|present|identified|enlarged|widened)|resolved|normal|within normal limits|unremarkable"
    r"|top normal|(?:is|are) not enlarged)\b")
UNCERTAIN_PRE = re.compile(
    r"\b(?:may|might|could|possibl[ey]|probabl[ey]|likely|suspect\w*|suspicious|suggest\w*|question\w*|equivocal|concern\w* for"
    r"|cannot exclude|can ?not exclude|differential|versus|vs|rule out|r/o|evaluate for|consider\w*|borderline|vague|indeterminate"
    r"|obscur\w*|not (?:well )?(?:visualized|assessed)|may represent)\b")
# Phrases that carry a cue word but state no negation: "no change in the effusion" still reports an effusion.
NOT_A_NEGATION = re.compile(r"\bno (?:significant |interval |appreciable |substantial )?change(?: in| of)?\b|\bnot changed\b|\bunchanged\b")
# A cue applies within its clause: these words or marks start a new one.
CLAUSE_BREAK = re.compile(r"\b(?:but|however|although|though|except|aside from|apart from|which|whereas|while)\b|[;:]|\bwith (?!no\b)")


def _clause_bounds(sentence: str, start: int, end: int) -> tuple[int, int]:
    """The clause around a mention at [start, end)."""
    left = max((m.end() for m in CLAUSE_BREAK.finditer(sentence) if m.end() <= start), default=0)
    right = min((m.start() for m in CLAUSE_BREAK.finditer(sentence) if m.start() >= end), default=len(sentence))
    return left, right


def mention_polarity(sentence: str, start: int, end: int) -> float:
    """1, 0 or -1 for the mention at [start, end) of a lower-cased, cleaned sentence."""
    left, right = _clause_bounds(sentence, start, end)
    before, after = sentence[left:start], sentence[end:right]
    if UNCERTAIN_POST.search(after):
        return -1.0
    if NEGATION_PRE.search(before) or NEGATION_POST.search(after):
        return 0.0
    return -1.0 if UNCERTAIN_PRE.search(before) else 1.0


def label_report(report: str) -> dict[str, float | None]:
    """The 14 CheXpert labels of one report."""
    votes: dict[str, list[float]] = {label: [] for label in CHEXPERT_LABELS}
    for sentence in split_sentences(re.sub(r"\s+", " ", report or "").strip()):
        text = NOT_A_NEGATION.sub("stable", sentence.lower())
        for label, pattern in MENTION_PATTERNS.items():
            votes[label] += [mention_polarity(text, m.start(), m.end()) for m in pattern.finditer(text)]
    labels: dict[str, float | None] = {}
    for label, found in votes.items():
        labels[label] = 1.0 if 1.0 in found else -1.0 if -1.0 in found else 0.0 if found else None
    for child in ("Consolidation", "Edema", "Atelectasis"):  # CheXpert's hierarchy: these are lung opacities
        if labels[child] == 1.0 and labels["Lung Opacity"] is None:
            labels["Lung Opacity"] = 1.0
    labels["No Finding"] = None if any(labels[p] in (1.0, -1.0) for p in PATHOLOGIES) else 1.0
    return labels


def label_reports(reports: list[str]) -> list[dict[str, float | None]]:
    return [label_report(report) for report in reports]
