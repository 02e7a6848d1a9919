"""Radiology report text: placeholder clean-up, section choice, and sentence-aware truncation."""

from __future__ import annotations

import re

SECTIONS = ("findings", "impression", "both", "full")

# Headers seen in MIMIC-CXR, IU X-Ray, CheXpert Plus and PadChest translations.
_HEADER = re.compile(
    r"(?i)\b(?P<name>findings?|impressions?|conclusions?|indications?|clinical history|history|comparisons?|"
    r"technique|examination|reason for (?:exam|study)|final report|notification|recommendations?)\s*:"
)
_CANONICAL = {"finding": "findings", "findings": "findings", "impression": "impression", "impressions": "impression",
              "conclusion": "impression", "conclusions": "impression"}
# De-identification placeholders: IU X-Ray "XXXX", MIMIC-CXR "___", and bracketed tags.
_PLACEHOLDER = re.compile(r"\bX{2,}\b|_{2,}|\[\*\*[^\]]*\*\*\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(])")


def clean_report(text: str | None) -> str:
    """Remove de-identification placeholders, stray punctuation and extra whitespace."""
    if not text:
        return ""
    text = _PLACEHOLDER.sub(" ", str(text))
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([.,;:])", r"\1", text)
    text = re.sub(r"([.,;:])(?:\s*[.,;:])+", r"\1", text)  # ". ." left behind by removed placeholders
    return text.strip(" ,;:")


def split_sections(text: str) -> dict[str, str]:
    """Map of lower-case section name -> text; text before any header is under "preamble"."""
    sections: dict[str, str] = {}
    matches = list(_HEADER.finditer(text))
    if not matches:
        return {"preamble": text.strip()}
    if matches[0].start() > 0 and text[: matches[0].start()].strip():
        sections["preamble"] = text[: matches[0].start()].strip()
    for match, following in zip(matches, matches[1:] + [None]):
        name = match.group("name").lower()
        body = text[match.end() : following.start() if following else len(text)].strip()
        name = _CANONICAL.get(name, name)
        sections[name] = f"{sections[name]} {body}".strip() if name in sections else body
    return sections


def select_section(text: str, section: str = "impression") -> str:
    """The cleaned `section` ("findings", "impression", "both" or "full") of a report.

    A report without headers is all body. A missing section falls back to the other one
    (impression <-> findings), as the R2Gen and RoentGen pipelines do.
    """
    if section not in SECTIONS:
        raise ValueError(f"report_section must be one of {SECTIONS}, got {section!r}")
    sections = split_sections(text or "")
    if section == "full" or set(sections) == {"preamble"}:
        return clean_report(" ".join(sections.values()))
    findings, impression = sections.get("findings", ""), sections.get("impression", "")
    chosen = {"findings": findings or impression, "impression": impression or findings,
              "both": " ".join(s for s in (findings, impression) if s)}[section]
    return clean_report(chosen)


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def truncate_to_tokens(text: str, count_tokens, max_tokens: int) -> tuple[str, bool]:
    """Keep whole sentences while `count_tokens(text) <= max_tokens`; returns (text, was_truncated).

    If even the first sentence is too long it is cut at a word boundary, never mid-word.
    """
    if count_tokens(text) <= max_tokens:
        return text, False
    kept: list[str] = []
    for sentence in split_sentences(text):
        if count_tokens(" ".join(kept + [sentence])) > max_tokens:
            break
        kept.append(sentence)
    if kept:
        return " ".join(kept), True
    words = text.split()
    low, high = 0, len(words)  # binary search for the longest fitting word prefix
    while low < high:
        mid = (low + high + 1) // 2
        if count_tokens(" ".join(words[:mid])) <= max_tokens:
            low = mid
        else:
            high = mid - 1
    return " ".join(words[:low]), True
