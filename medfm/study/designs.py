"""The three reader-study designs: what an item shows, what a reader answers, and how an answer is checked."""

from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("real", "synthetic")
LIKERT = (1, 2, 3, 4, 5)
PREFERENCES = ("A", "B", "equal")
# ReXVal (Yu et al. 2023) / RadCliQ error categories, each counted as clinically significant or insignificant.
REPORT_ERROR_CATEGORIES = (
    "False prediction of finding",
    "Omission of finding",
    "Incorrect location/position of finding",
    "Incorrect severity of finding",
    "Mention of comparison that is not present in the reference impression",
    "Omission of comparison describing a change from a previous study",
)


class AnswerError(ValueError):
    """An answer that does not fit the design; the message says which field and what it accepts."""


@dataclass(frozen=True)
class Design:
    """A study design: `cases_per_item` cases are shown together (2 for pairwise) and `fields` are answered."""

    name: str
    cases_per_item: int
    fields: tuple[str, ...]
    description: str

    def check(self, answer: dict, findings: list[str] = ()) -> dict:
        """`answer` restricted to this design's fields, or AnswerError naming the first missing or invalid one."""
        checked = {}
        for name in self.fields:
            try:
                checked[name] = _CHECKS[name](answer.get(name), findings)
            except AnswerError as err:
                raise AnswerError(f"{name.replace('_', ' ')}: {err}") from None
        return checked


def _choice(options):
    def check(value, findings):
        if value not in options:
            raise AnswerError(f"choose one of {', '.join(map(str, options))}")
        return value

    return check


def _whole_number(value, accepts, message: str) -> int:
    """`value` as an int if it is a whole number that `accepts`, else AnswerError(message)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise AnswerError(message) from None
    if not accepts(number) or float(value) != number:
        raise AnswerError(message)
    return number


def _listed(value, known, what: str, hint: str = "") -> list:
    """`value` as a list, or AnswerError naming the items of it that are not in `known`."""
    value = list(value or [])
    unknown = [v for v in value if v not in known]
    if unknown:
        raise AnswerError(f"unknown {what} {unknown}{hint}")
    return value


def _likert(value, findings):
    return _whole_number(value, lambda number: number in LIKERT, "choose a score from 1 to 5")


def _findings(value, findings):
    value = _listed(value, findings, "findings", f"; the study lists {list(findings)}")
    return sorted(value, key=list(findings).index)


def _count(value, findings):
    return _whole_number(value, lambda number: number >= 0, "give a whole number of errors (0 or more)")


def _categories(value, findings):
    return _listed(value, REPORT_ERROR_CATEGORIES, "error categories")


def _comment(value, findings):
    return str(value or "").strip()[:2000]


_CHECKS = {
    "source": _choice(SOURCES), "confidence": _likert,
    "realism": _likert, "plausibility": _likert, "findings": _findings, "comment": _comment,
    "preference": _choice(PREFERENCES),
    "significant_errors_a": _count, "insignificant_errors_a": _count, "significant_errors_b": _count, "insignificant_errors_b": _count,
    "error_categories_a": _categories, "error_categories_b": _categories,
}
_REPORT_ERRORS = ("significant_errors_a", "insignificant_errors_a", "significant_errors_b", "insignificant_errors_b",
                  "error_categories_a", "error_categories_b")

DESIGNS = {
    "turing": Design("turing", 1, ("source", "confidence"), "Real or synthetic? With a confidence from 1 (guess) to 5 (certain)."),
    "rating": Design("rating", 1, ("realism", "plausibility", "findings", "comment"),
                     "Realism and anatomical plausibility (1-5), the findings present, a free comment."),
    "pairwise": Design("pairwise", 2, ("preference", "comment"), "Two images for one prompt: which is better?"),
}


def design_for(name: str, reports: bool = False) -> Design:
    """The design called `name`; pairwise over reports also asks for the ReXVal error counts of each report."""
    if name not in DESIGNS:
        raise ValueError(f"unknown design {name!r}; choose one of {', '.join(DESIGNS)}")
    design = DESIGNS[name]
    if name == "pairwise" and reports:
        return Design(design.name, design.cases_per_item, design.fields + _REPORT_ERRORS,
                      "Two reports for one radiograph: which is better? Count each report's clinically significant and insignificant errors.")
    return design
