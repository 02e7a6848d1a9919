"""Rewards for generated reports: small pure functions over (completions, references, images) -> one float per report,
composed by weights (the training config's `reward: {clinical_micro: 1.0, length: 0.2, rougel: 0.3}`, the default).

Built-in terms (higher is better; each in [0, 1] but `clinical_micro`):

- `clinical`: per report, F1 over the 14 CheXpert observations between the labels medfm's labeler reads in the
  generated report and in its reference (uncertain mentions count as `medfm eval reports` counts them: negative by
  default); a negated finding ("no effusion") is not a positive.
- `clinical_micro`: the same labels, scored as the benchmark tables score them: each report's share of the micro-F1
  over all the reports scored together (a difference reward, n x (micro-F1 of all - micro-F1 without this report)).
  A false mention costs what a missed finding costs wherever it falls, and a hedged finding ("possible pneumonia",
  uncertain) costs less than a committed wrong one; per-report F1 instead rewards committing (a report that names
  nothing scores 0). Depends on the batch it is scored in, so it is about 0 on average, negative for poor reports.
- `length`: 1 - |words - reference words| / reference words, floored at 0: keeps reports near the reference's length
  (a reward on one metric alone gets gamed by shorter or longer reports).
- `bleu4`: smoothed sentence BLEU-4, `rougel`: ROUGE-L F1 (torchmetrics, lower-cased, as `quick_report_metrics`).
- `bertscore@/local/model/folder`: BERTScore F1 with a local model (as `medfm eval reports --bertscore_model`).
- `radgraph`, `chexbert`, `green`, `ratescore`, `radcliq`: RadEval's per-report scores through `medfm.eval.clinical`
  (RadGraph partial F1, CheXbert example F1, GREEN, RaTEScore, minus RadCliQ-v1); needs `pip install 'medfm[clinical]'` and
  the metric's weights, which RadEval downloads from the Hub on first use.
- `package.module:function`: any function called as `function(completions=[str], references=[str], images=[[PIL.Image]])`
  that returns one float per completion (`images`: each study's images, or None when the caller has none).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchmetrics.functional.text import bleu_score, rouge_score

from .eval.labeler import label_reports
from .eval.report_metrics import label_matrix
from .user_code import import_function

RewardFunction = Callable[..., Sequence[float]]
RADEVAL_TERMS = ("radgraph", "chexbert", "green", "ratescore", "radcliq")  # medfm.eval.clinical.METRICS


def _label_matrices(completions: list[str], references: list[str], uncertain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reports x 14 boolean CheXpert label matrices of the completions and of their references."""
    return label_matrix(label_reports(completions), uncertain), label_matrix(label_reports(references), uncertain)


def clinical(completions: list[str], references: list[str], images=None, uncertain: str = "negative") -> list[float]:
    """Per-report F1 over the 14 CheXpert labels of completion vs reference (1.0 when neither names any)."""
    predicted, reference = _label_matrices(completions, references, uncertain)
    # By hand: torchmetrics' samplewise multilabel F1 fails on a single report (it squeezes the batch dimension away).
    named = predicted.sum(1) + reference.sum(1)
    return torch.where(named > 0, 2 * (predicted & reference).sum(1) / named.clamp(min=1), 1.0).tolist()


def clinical_micro(completions: list[str], references: list[str], images=None, uncertain: str = "negative") -> list[float]:
    """n x (micro-F1 over the 14 CheXpert labels of all n reports - the same without report i), for each report i."""
    predicted, reference = _label_matrices(completions, references, uncertain)
    hits, errors = (predicted & reference).sum(1).double(), (predicted ^ reference).sum(1).double()

    def micro_f1(hits, errors):
        return torch.where(2 * hits + errors > 0, 2 * hits / (2 * hits + errors).clamp(min=1), 1.0)

    return (len(completions) * (micro_f1(hits.sum(), errors.sum()) - micro_f1(hits.sum() - hits, errors.sum() - errors))).tolist()


def length(completions: list[str], references: list[str], images=None) -> list[float]:
    """1 - relative difference in words from the reference, floored at 0."""
    scores = []
    for completion, reference in zip(completions, references):
        target = max(len(reference.split()), 1)
        scores.append(max(0.0, 1.0 - abs(len(completion.split()) - target) / target))
    return scores


def bleu4(completions: list[str], references: list[str], images=None) -> list[float]:
    """Smoothed sentence BLEU-4 (lower-cased): unsmoothed, a short report without a shared 4-gram scores 0."""
    return [float(bleu_score([c.lower()], [[r.lower()]], n_gram=4, smooth=True)) for c, r in zip(completions, references)]


def rougel(completions: list[str], references: list[str], images=None) -> list[float]:
    """ROUGE-L F1 (lower-cased)."""
    return [float(rouge_score(c.lower(), r.lower(), rouge_keys="rougeL")["rougeL_fmeasure"]) for c, r in zip(completions, references)]


def bertscore(model_path: str) -> RewardFunction:
    """BERTScore F1 with a local model folder (never downloads)."""
    from .eval.report_metrics import bertscore_f1

    def score(completions: list[str], references: list[str], images=None) -> list[float]:
        return bertscore_f1(references, completions, model_path).tolist()

    return score


def radeval(metric: str) -> RewardFunction:
    """A RadEval metric by name through medfm.eval.clinical's per_report_scores (imported only when such a term is asked for);
    metrics where lower is better (RadCliQ) are negated, so that higher is better for every term."""
    try:
        clinical_metrics = importlib.import_module("medfm.eval.clinical")
    except ImportError as err:
        raise ImportError(f"reward term {metric!r} uses RadEval through medfm.eval.clinical: pip install 'medfm[clinical]' (radeval); "
                          f"its weights (e.g. StanfordAIMI/RRG_scorers) download from the Hub on first use ({err})") from err
    sign = 1.0 if clinical_metrics.METRICS[metric].higher_is_better else -1.0

    def score(completions: list[str], references: list[str], images=None) -> list[float]:
        return [sign * value for value in clinical_metrics.per_report_scores(metric, completions, references)]

    return score


def user_function(path: str) -> RewardFunction:
    """`package.module:function` imported (the module must be importable: installed, or on PYTHONPATH)."""
    return import_function(path, "reward term", "(completions, references, images) -> floats")


BUILTIN_TERMS: dict[str, RewardFunction] = {"clinical": clinical, "clinical_micro": clinical_micro, "length": length, "bleu4": bleu4, "rougel": rougel}


def reward_function(name: str) -> RewardFunction:
    """The function behind one term name of a reward config."""
    if name in BUILTIN_TERMS:
        return BUILTIN_TERMS[name]
    if name.startswith("bertscore@"):
        return bertscore(name.removeprefix("bertscore@"))
    if name in RADEVAL_TERMS:
        return radeval(name)
    if ":" in name:
        return user_function(name)
    raise ValueError(f"Unknown reward term {name!r}; use one of {', '.join(BUILTIN_TERMS)}, bertscore@/local/model, "
                     f"{', '.join(RADEVAL_TERMS)} (RadEval), or package.module:function")


@dataclass
class RewardScores:
    total: list[float]  # the weighted sum, one per completion
    terms: dict[str, list[float]]  # each term's unweighted values


class Reward:
    """A weighted sum of reward terms: `Reward({"clinical": 1.0, "length": 0.2})(completions, references, images)`."""

    def __init__(self, weights: dict[str, float]):
        if not weights:
            raise ValueError("reward: give at least one term, e.g. {clinical: 1.0, length: 0.2}")
        self.weights = dict(weights)
        self.functions = {name: reward_function(name) for name in self.weights}

    def __call__(self, completions: list[str], references: list[str], images: list[list] | None = None) -> RewardScores:
        if len(completions) != len(references):
            raise ValueError(f"{len(completions)} completions but {len(references)} references")
        terms = {}
        for name, function in self.functions.items():
            values = [float(v) for v in function(completions=completions, references=references, images=images)]
            if len(values) != len(completions):
                raise ValueError(f"reward term {name!r} returned {len(values)} values for {len(completions)} completions")
            terms[name] = values
        total = torch.tensor([terms[name] for name in self.weights]).T @ torch.tensor(list(self.weights.values()))
        return RewardScores(total.tolist(), terms)

    def describe(self) -> str:
        return " + ".join(f"{weight:g} x {name}" for name, weight in self.weights.items())
