"""A rule-based labeler for the 14 CheXpert observations: positive (1), negative (0), uncertain (-1), not mentioned (None).

Hand-written because no maintained pip package does it offline (the CheXpert labeler needs NegBio + a
parser; CheXbert needs a model download). It follows the CheXpert labeler's logic with medfm's own rules: find
mentions per sentence (skipping "unmentions" such as "pericardial effusion" or "calcified nodule"), decide each
mention's polarity from negation / uncertainty cues in its clause, then aggregate per report (positive > uncertain >
negative). Anatomy that is only described ("heart size", "the mediastinum", "cardiomediastinal silhouette") counts
only with a predicate: enlarged / widened -> 1, borderline / obscured -> -1, normal / stable / unchanged -> 0.
"No Finding" is 1 when no pathology, nor any other finding CheXpert lists (emphysema, granuloma, scoliosis, ...),
is positive or uncertain. Conventions are listed in the README (Evaluation, Labeler).
"""

from __future__ import annotations

import re

from ..data.phantom import CHEXPERT_LABELS
from ..data.reports import split_sections

# Finding mentions: their polarity comes from negation / uncertainty cues.
MENTIONS = {
    "Enlarged Cardiomediastinum": r"mediastinal (?:widening|enlargement)|widening of the (?:superior )?mediastinum",
    "Cardiomegaly": r"cardiomegaly|cardiac enlargement",
    "Lung Opacity": r"opaci\w*|infiltrat\w*|air[- ]?space (?:disease|opacit\w*)|haz(?:y|iness)|densit(?:y|ies)|ground[- ]glass"
                    r"|interstitial (?:markings?|pattern|opacit\w*|prominence|lung disease|disease)|reticula\w*"
                    r"|scar(?:s|ring)?|(?:peribronchial|bronchial wall) thickening",
    "Lung Lesion": r"nodul(?:e|es|ar opacit\w*|ar densit\w*)\b|mass(?:es)?\b|(?<!lytic )(?<!sclerotic )(?<!blastic )(?<!osseous )(?<!bony )"
                   r"(?<!bone )(?<!skin )lesions?|tumou?rs?|neoplasm\w*|carcinoma|lump",
    "Edema": r"o?edema|(?:vascular|pulmonary|venous) congestion|fluid overload|vascular engorgement|heart failure|\bchf\b"
             r"|vascular (?:prominence|indistinctness)|indistinctness",
    "Consolidation": r"consolidat\w*",
    "Pneumonia": r"pneumonias?|pneumonic|infect\w*",
    "Atelectasis": r"atelecta\w*|collapse[ds]?",
    "Pneumothorax": r"pneumothora(?:x|ces)|\bptx\b",
    "Pleural Effusion": r"(?<!pericardial )effusions?|pleural fluid|hydrothorax",
    "Pleural Other": r"pleural (?:thickening|scar\w*|plaques?|calcifications?)|pleural-parenchymal scar\w*|pleuroparenchymal scar\w*"
                     r"|fibrothorax|fibrosis|fibrotic|(?<=effusion or )thickening|(?<=effusions or )thickening",
    "Fracture": r"fractur\w*",
    "Support Devices": r"tubes?|(?<!pleural )(?<!kerley b )(?<!septal )(?<!fold )(?<!skin )(?<!paraspinal )(?<!junction )(?<!paratracheal )"
                       r"(?<!azygoesophageal )lines?|catheters?|picc|pacemakers?|pacers?|pacing|defibrillators?|\ba?icd\b|swan[- ]ganz|port-?a-?cath"
                       r"|mediport|(?:chest|power|infusion) port|\bport\b|stents?|drains?|tracheostomy|hardware|arthroplast\w*|plates?(?![- ]?like| atelecta)"
                       r"|screws?|cannula|coils?|devices?|\becmo\b|impella|balloon pump|\biabp\b|\blvad\b"
                       r"|(?:prosthetic|mechanical|bioprosthetic|artificial) (?:\w+ )?valves?|valve (?:replacement|prosthesis)",
}
# Phrases that contain a mention but are not one (CheXpert's "unmention" idea).
UNMENTIONS = {
    "Lung Lesion": r"calcified (?:\w+ )?nodul\w*|massive|mass effect",
    "Lung Opacity": r"(?:bone|bony|osseous|mineral|soft tissue|breast) densit\w*|pleural scar\w*|pleural-parenchymal scar\w*"
                    r"|pleuro-?parenchymal scar\w*",
    "Edema": r"heart failure (?:clinic|service)",
    "Atelectasis": r"(?:vertebral|body|height) collapse\w*",
}
# Anatomy that is only described: it counts when a predicate says how it looks.
ANATOMY = {
    ("Cardiomegaly",): r"heart(?: size)?|cardiac (?:and mediastinal )?(?:silhouettes?|size|contours?|shadow|outline)",
    ("Enlarged Cardiomediastinum",): r"mediastinum|mediastinal (?:and hilar )?(?:silhouettes?|contours?|structures|width|configuration)",
    ("Cardiomegaly", "Enlarged Cardiomediastinum"): r"cardio ?mediastinal (?:silhouettes?|contours?)|cardiomediastinum",
}
ANATOMY_UNMENTIONS = r"heart (?:border|failure|valve)|(?:right|left) heart" \
                     r"|(?:over(?:lying)?|in|behind|projecting over|projects over|within) the (?:heart|cardiac)"
ABNORMAL = r"enlarg\w*|large|increas\w*|prominen\w*|widen\w*|cardiomegaly"
NORMAL = r"not (?:\w+ )?(?:enlarged|widened|increased)|no longer (?:enlarged|widened)|upper limits? of normal|(?:top|upper|high)[- ]normal" \
         r"|normal|unremarkable|stable|similar"
UNCERTAIN_SIZE = r"borderline|obscur\w*|difficult to (?:assess|evaluate)|(?:cannot|can not|not) be (?:assessed|evaluated)|poorly (?:assessed|evaluated)" \
                 r"|not (?:well )?(?:assessed|evaluated|visualized)|indeterminate"
PREDICATE = re.compile(rf"\b(?:(?P<normal>{NORMAL})|(?P<uncertain>{UNCERTAIN_SIZE})|(?P<abnormal>{ABNORMAL}))\b")
SOFT_NORMAL = re.compile(r"stable|similar")
NO_BEFORE = re.compile(r"\b(?:no|not|without)\W+(?:\w+\W+)?$")
HEDGE = re.compile(r"\b(?:may|might|could|possibl[ey]|probabl[ey]|likely|questionabl[ey]|suspect\w*|borderline|equivocal)\b|\?")

# Findings outside the 14 that still mean the study is not normal (CheXpert's no_finding phrase list, plus a few such as tortuous aorta).
OTHER_FINDINGS = (r"emphysema\w*|hyperinfla\w*|hyperexpan\w*|hyperdisten\w*|arthrit\w*|lordosis|cysts?|cystic"
                  r"|(?:increased|coarse\w*|accentuated) (?:bronchovascular|lung|pulmonary|vascular) markings|\bcopd\b|bullae|bullous|blunt\w*"
                  r"|elevat\w*|eventration|scoliosis|kyphosis|kyphoscoliosis"
                  r"|degenerat\w*|spondylo\w*|osteophyt\w*|calcifi\w*|granulom\w*|hernia|atherosclero\w*|osteopenia|metasta\w*|pneumomediastinum"
                  r"|pneumoperitoneum|cephalization|aspiration|contusion|bronchiectasis|bronchitis|bronchiolitis|airways? disease|cuffing"
                  r"|hemorrhage|hematoma|deformit\w*|volume loss|tortu\w*|ectatic|ectasia|pulmonary (?:arterial )?hypertension|hyperlucen\w*"
                  r"|(?<!peribronchial )(?<!wall )thickening|prominen\w*|inflammat\w*|kerley|enlarged (?:pulmonary|hilar) (?:arter\w*|vessels)"
                  r"|(?:pulmonary|hilar) arter(?:y|ies) (?:is |are )?enlarged|lucenc\w*|(?:lytic|sclerotic|blastic|osseous|bony|bone) lesions?")
OTHER = "Other Finding"

# One scan finds every mention; each sits in a lookahead so that overlapping ones ("nodular opacity": lesion and opacity) are all found.
_KINDS = [((label,), "finding", pattern) for label, pattern in MENTIONS.items()] + [((OTHER,), "finding", OTHER_FINDINGS)] \
    + [(labels, "anatomy", pattern) for labels, pattern in ANATOMY.items()]
MENTION_SCAN = re.compile(r"\b(?=" + "|".join(rf"(?P<k{i}>(?:{pattern})\b)" for i, (_, _, pattern) in enumerate(_KINDS)) + ")")
UNMENTION_PATTERNS = {label: re.compile(rf"\b(?:{pattern})") for label, pattern in UNMENTIONS.items()}
ANATOMY_UNMENTION = re.compile(rf"\b(?:{ANATOMY_UNMENTIONS})\b")
PATHOLOGIES = [label for label in CHEXPERT_LABELS if label not in ("No Finding", "Support Devices")]
OPACITY_CHILD = re.compile(r"o?edema|consolidat|atelecta|collapse")  # CheXpert's hierarchy: these mentions are lung opacities
HEDGED_MENTION = re.compile(r"vascular prominence|vascular indistinctness|indistinctness")  # CheXpert: at most uncertain edema
CHF = re.compile(r"heart failure|\bchf\b")  # CheXpert: heart failure also makes Cardiomegaly uncertain

# Cues, matched on lower-cased text. Pre cues precede the mention within its clause; post cues follow it.
UNCERTAIN_POST = re.compile(r"can ?not be (?:excluded|ruled out)|not (?:be )?(?:entirely |completely )?excluded|(?:is|are) not ruled out"
                            r"|(?:is|are|was|were) (?:also |still )?(?:suspected|questionable|less likely|unlikely|favou?red|a consideration)|if any"
                            r"|(?:could|may|might) be present|\?"
                            r"|(?:is|are|was|were) (?:also |still )?(?:likely|possible|probable)(?=\W*$|\W+(?:present|given|in|at|on|within|and|but)\b)")
UNCERTAIN_POST_WEAK = re.compile(r"^(?:,? (?:or|versus|vs\.?|and/or)\b|/)")  # "atelectasis or pneumonia": both uncertain (CheXpert)
NEGATION_POST = re.compile(
    r"\b(?:(?:is|are|has|have) (?:now )?(?:been )?(?:resolved|cleared|removed|absent)|not (?:seen|identified|present|demonstrated|visualized|appreciated"
    r"|evident|detected|noted)|no longer (?:seen|present|visualized|evident|identified|demonstrated|noted)|resolved|removed|removal|within normal limits"
    r"|(?:is|are) (?:normal|unremarkable)|(?:is|are) not enlarged)\b")
PRE_WINDOW = 10  # words before a mention that a negation or uncertainty cue reaches ("no consolidation, effusion, or pneumothorax")
NEGATION_PRE = (r"no|not|without|negative for|free of|clear of|absence of|absent|resolution of|resolved|removal of|rather than"
                r"|history of|clearing of|disappearance of|rule out|r/o|ruled out")
UNCERTAIN_PRE = (r"can ?not (?:be )?(?:excluded?|ruled? out)|not exclude|no new|without new|cannot rule out"  # before "no" / "not": they contain them
                 r"|may|might|could|would|possibl[ey]|probabl[ey]|likely|presum\w*|suspect\w*|(?<!no )suspicious|suspicion|question\w*|equivocal"
                 r"|concern\w* for|worrisome for|favou?red over|if any|(?<!to )suggest\w*|differential|consider\w*|borderline|vague|indeterminate"
                 r"|obscur\w*(?! by)|not (?:well )?(?:visualized|assessed)|evaluate for|assess for|correlat\w* (?:clinically )?for|clinical correlation")
LINKING = re.compile(r"concern\w* for|worrisome for|suggest\w*|suspicious")
PRE_CUE = re.compile(rf"\b(?:(?P<uncertain>{UNCERTAIN_PRE})|(?P<negation>{NEGATION_PRE}))\b")
UNCERTAIN_PRE_WEAK = re.compile(r"(?:\b(?:or|versus|vs|and/or)(?: \w+)?\W*|/)$")  # "atelectasis or pneumonia", unless negated
NEAR_WINDOW = 3  # "normal" negates only what it directly qualifies ("normal heart size", not "normal heart size, and an effusion")
NEGATION_NEAR = re.compile(r"\b(?:normal|unremarkable)\b")
# Phrases that carry a cue word but state no negation: "no change in the effusion" still reports an effusion.
NOT_A_NEGATION = re.compile(r"\bno (?:significant |interval |appreciable |substantial |definite )?change(?: in| of)?\b|\bnot changed\b|\bunchanged\b"
                            r"|\b(?:partially|partly|incompletely) (?:resolved|cleared)\b")
# A cue applies within its clause: these words or marks start a new one.
CLAUSE_BREAK = re.compile(r"\b(?:but|however|although|though|except|aside from|apart from|which|whereas|while|otherwise|after|following)\b|[;:]"
                          r"|\bwith (?!no\b)|,? and (?=there\b|the\b|an?\b|is\b|are\b)|, (?=there\b)")


def _clause_bounds(breaks: list[tuple[int, int]], length: int, start: int, end: int) -> tuple[int, int]:
    """The clause around a mention at [start, end), given the sentence's clause breaks."""
    left = max((b_end for _, b_end in breaks if b_end <= start), default=0)
    right = min((b_start for b_start, _ in breaks if b_start >= end), default=length)
    return left, right


def _last_words(text: str, count: int) -> str:
    return " ".join(text.split()[-count:]) if count else ""


def mention_polarity(sentence: str, start: int, end: int, breaks: list[tuple[int, int]] | None = None) -> float:
    """1, 0 or -1 for the finding mention at [start, end) of a lower-cased, cleaned sentence."""
    breaks = [m.span() for m in CLAUSE_BREAK.finditer(sentence)] if breaks is None else breaks
    left, right = _clause_bounds(breaks, len(sentence), start, end)
    before, after = _last_words(sentence[left:start], PRE_WINDOW), sentence[end:right]
    if UNCERTAIN_POST.search(after):
        return -1.0
    if NEGATION_NEAR.search(_last_words(before, NEAR_WINDOW)):
        return 0.0
    cues = list(PRE_CUE.finditer(before))
    if cues:  # the cue nearest the mention wins ("no pneumothorax, possible small effusion"), but a negated finding
        last = cues[-1]  # negates what it would link to: "no consolidation concerning for pneumonia"
        if last.lastgroup == "uncertain" and LINKING.fullmatch(last.group()) and any(c.lastgroup == "negation" for c in cues[:-1]):
            return 0.0
        return -1.0 if last.lastgroup == "uncertain" else 0.0
    if NEGATION_POST.search(after):
        return 0.0
    return -1.0 if UNCERTAIN_POST_WEAK.search(after) or UNCERTAIN_PRE_WEAK.search(_last_words(before, 3)) else 1.0


def anatomy_polarity(sentence: str, start: int, end: int, breaks: list[tuple[int, int]]) -> float | None:
    """1, 0 or -1 for described anatomy at [start, end) from its predicate ("heart size is normal"), None without one."""
    left, right = _clause_bounds(breaks, len(sentence), start, end)
    before, after = _last_words(sentence[left:start], 5), sentence[end:right]
    pre = [m for m in PREDICATE.finditer(before)][-1:]  # the nearest predicate on each side: "normal heart size", "heart size is normal"
    post = [m for m in PREDICATE.finditer(after)]
    post = [m for m in post if not SOFT_NORMAL.fullmatch(m.group())][:1] or post[:1]  # "stable, moderately enlarged": the size wins
    kinds = {m.lastgroup for m in pre + post}
    if "abnormal" in kinds:
        if pre and pre[0].lastgroup == "abnormal" and NO_BEFORE.search(before[:pre[0].start()]):
            return 0.0  # "no enlarged heart"
        between = after[:post[0].start()] if post else ""
        return -1.0 if HEDGE.search(before) or HEDGE.search(between) else 1.0
    if "uncertain" in kinds:
        return -1.0
    return 0.0 if "normal" in kinds else None


def _overlaps(spans: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(start < s_end and end > s_start for s_start, s_end in spans)


# Sections that ask or describe the exam rather than report findings ("INDICATION: ? pneumonia").
NOT_FINDINGS = {"indication", "indications", "clinical history", "history", "comparison", "comparisons", "technique", "examination",
                "reason for exam", "reason for study", "notification"}


def findings_text(report: str) -> str:
    """The report without its indication / history / comparison / technique sections."""
    sections = split_sections(re.sub(r"\s+", " ", report or "").strip())
    return " ".join(body for name, body in sections.items() if name not in NOT_FINDINGS)


def sentences(text: str) -> list[str]:
    """Sentences at every full stop, whatever the case after it ("normal . no effusion ." as in lower-cased, tokenised reports)."""
    text = re.sub(r"\bvs\.", "vs", re.sub(r"\s+([.,;:!?])", r"\1", text), flags=re.I)
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def label_report(report: str) -> dict[str, float | None]:
    """The 14 CheXpert labels of one report (its findings, impression and any text outside named sections)."""
    votes: dict[str, list[float]] = {label: [] for label in [*CHEXPERT_LABELS, OTHER]}
    opacity_child = False
    for sentence in sentences(findings_text(report)):
        text = NOT_A_NEGATION.sub("stable", sentence.lower())
        found = [(int(m.lastgroup[1:]), m.span(m.lastgroup)) for m in MENTION_SCAN.finditer(text)]
        if not found:
            continue
        breaks = [m.span() for m in CLAUSE_BREAK.finditer(text)]
        unmentions: dict[str, list[tuple[int, int]]] = {}
        for kind, (start, end) in found:
            labels, role, _ = _KINDS[kind]
            unmention = ANATOMY_UNMENTION if role == "anatomy" else UNMENTION_PATTERNS.get(labels[0])
            if unmention is not None:
                key = "anatomy" if role == "anatomy" else labels[0]
                if key not in unmentions:
                    unmentions[key] = [m.span() for m in unmention.finditer(text)]
                if _overlaps(unmentions[key], start, end):
                    continue
            if role == "anatomy":
                if (polarity := anatomy_polarity(text, start, end, breaks)) is not None:
                    for label in labels:
                        votes[label].append(polarity)
                continue
            word = text[start:end]
            polarity = mention_polarity(text, start, end, breaks)
            if polarity == 1.0 and HEDGED_MENTION.match(word):
                polarity = -1.0
            votes[labels[0]].append(polarity)
            if polarity != 0.0 and labels[0] == "Edema" and CHF.match(word):
                votes["Cardiomegaly"].append(-1.0)
            opacity_child |= polarity == 1.0 and bool(OPACITY_CHILD.match(word))
    labels: dict[str, float | None] = {}
    for label, found in votes.items():
        labels[label] = 1.0 if 1.0 in found else -1.0 if -1.0 in found else 0.0 if found else None
    if opacity_child and labels["Lung Opacity"] is None:
        labels["Lung Opacity"] = 1.0
    other = labels.pop(OTHER)
    labels["No Finding"] = None if any(labels[p] in (1.0, -1.0) for p in PATHOLOGIES) or other in (1.0, -1.0) else 1.0
    return labels


def label_reports(reports: list[str]) -> list[dict[str, float | None]]:
    return [label_report(report) for report in reports]
