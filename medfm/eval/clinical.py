"""Clinical report metrics from the field's own package, RadEval: CheXbert labels, RadGraph F1, GREEN, RaTEScore, RadCliQ-v1.

`METRICS` maps a metric name to its package, the Hub weights the package loads, and a scorer returning per-report columns;
`per_report_scores(name, hypotheses, references)` gives the one column a reward uses (a list of floats, one per report).
RadEval downloads its weights with huggingface_hub on first use into its own caches (~/.cache/chexbert,
~/.cache/radgraph/0.1.18 and the Hugging Face cache); `metrics_dir` points all of them at one Hugging Face cache folder
instead and never touches the network. Missing weights offline raise MissingMetricWeights with the `hf download` commands.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import json
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..data.phantom import CHEXPERT_LABELS

INSTALL = 'pip install "medfm[clinical]"'
RRG_SCORERS = "StanfordAIMI/RRG_scorers"


class MissingMetricWeights(FileNotFoundError):
    """A clinical metric's weights are neither in the cache its package reads nor in --metrics_dir, and we may not download."""


@dataclass(frozen=True)
class Weights:
    """Hub files a package loads: `files` from `repo_id` (none listed: the whole repo, as from_pretrained reads it)."""

    repo_id: str
    files: tuple[str, ...] = ()
    cache: str = "hub"  # the cache the package reads them from: "hub" (Hugging Face cache), "chexbert" or "radgraph" (RadEval's own)

    def download_command(self, cache_dir: str) -> str:
        return " ".join(["hf download", self.repo_id, *self.files, "--cache-dir", cache_dir])


@dataclass(frozen=True)
class ClinicalMetric:
    """A metric name -> the package that computes it, the weights it needs, and its scorer (hypotheses, references) -> per-report columns."""

    name: str
    package: str
    weights: tuple[Weights, ...]
    scorer: Callable[[list[str], list[str]], dict[str, np.ndarray]]
    reward: str  # the per-report column a reward uses
    higher_is_better: bool = True
    policy: str = ""  # how its output is read, printed with the results


# ------------------------------------------------------------------------------------------------ RadEval plumbing
class _RadEvalAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """RadEval 2.2.1's vendored RadGraph imports itself as `RadEval.*` but installs as `radeval` (jbdel/RadEval#27): on
    case-sensitive file systems that import fails. This maps every `RadEval.*` name to the already-installed module."""

    def find_spec(self, name, path=None, target=None):
        if name == "RadEval" or name.startswith("RadEval."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("radeval" + spec.name[len("RadEval"):])

    def exec_module(self, module) -> None:
        pass


def _import(module: str, metric: str):
    """Import a RadEval module, or say which package to install."""
    if importlib.util.find_spec("radeval") is None:
        raise ModuleNotFoundError(f"--metrics {metric} needs the RadEval package: {INSTALL} (or pip install radeval)")
    if importlib.util.find_spec("RadEval") is None and not any(isinstance(f, _RadEvalAlias) for f in sys.meta_path):
        sys.meta_path.insert(0, _RadEvalAlias())
    try:
        return importlib.import_module(module)
    except ValueError as err:
        if "numpy.dtype size changed" in str(err):  # medspacy pins spacy<3.8 on Python < 3.12; that thinc is built for numpy 1.x
            raise ImportError(f"--metrics {metric}: {module} imports spaCy, whose build does not match numpy {np.__version__}; "
                              'pip install "spacy>=3.8" (medspacy asks for spacy<3.8 only on Python < 3.12)') from err
        raise


RADEVAL_CACHES = {"chexbert": "radeval.metrics.f1chexbert.f1chexbert", "radgraph": "radeval.metrics.radgraph._vendor.core"}  # module.CACHE_DIR


def cache_dir(kind: str) -> str:
    """The folder weights of `kind` are read from now: huggingface_hub's cache, or a RadEval module's CACHE_DIR."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE if kind == "hub" else _import(RADEVAL_CACHES[kind], kind).CACHE_DIR


@contextlib.contextmanager
def weights_from(metrics_dir: str | Path | None, kinds: set[str]) -> Iterator[None]:
    """Within the block, the packages read weights of `kinds` from the Hugging Face cache folder `metrics_dir`, offline."""
    if metrics_dir is None:
        yield
        return
    from huggingface_hub import constants

    folder = str(Path(metrics_dir).expanduser())
    modules = [_import(RADEVAL_CACHES[kind], kind) for kind in sorted(kinds - {"hub"})]
    saved = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE, [m.CACHE_DIR for m in modules]
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = folder, True
    for module in modules:
        module.CACHE_DIR = folder
    try:
        yield
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved[0], saved[1]
        for module, value in zip(modules, saved[2]):
            module.CACHE_DIR = value


def _cached(weights: Weights, cache_dir: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    if weights.cache == "radgraph" and any((Path(cache_dir) / weights.files[0].removesuffix(".tar.gz")).glob("*")):
        return True  # RadGraph already unpacked its archive there
    return all(isinstance(try_to_load_from_cache(weights.repo_id, name, cache_dir=cache_dir), str) for name in weights.files or ("config.json",))


def _radgraph_encoder(weights: Weights, cache_dir: str) -> Weights | None:
    """The Hub encoder a cached RadGraph archive names in its config.json (AutoModel / AutoTokenizer load it by that id)."""
    from huggingface_hub import try_to_load_from_cache

    unpacked = Path(cache_dir) / weights.files[0].removesuffix(".tar.gz") / "config.json"
    if unpacked.is_file():
        config = json.loads(unpacked.read_text())
    else:
        archive = try_to_load_from_cache(weights.repo_id, weights.files[0], cache_dir=cache_dir)
        if not isinstance(archive, str):
            return None
        with tarfile.open(archive, "r:gz") as tar:
            member = next(m for m in tar.getmembers() if m.name.lstrip("./") == "config.json")
            config = json.loads(tar.extractfile(member).read())
    return Weights(config["model"]["embedder"]["token_embedders"]["bert"]["model_name"])


def check_weights(metric: ClinicalMetric) -> None:
    """Offline (HF_HUB_OFFLINE or --metrics_dir), every weight file must be cached: else one error naming them and the commands."""
    from huggingface_hub import constants

    caches = {kind: cache_dir(kind) for kind in {w.cache for w in metric.weights} | {"hub"}}
    needed = list(metric.weights) + [e for w in metric.weights if w.cache == "radgraph" and (e := _radgraph_encoder(w, caches["radgraph"]))]
    missing = [w for w in needed if not _cached(w, caches[w.cache])]
    if missing and constants.HF_HUB_OFFLINE:
        lines = "\n".join(f"  {w.repo_id} {' '.join(w.files) or '(whole repo)'}:  {w.download_command(caches[w.cache])}" for w in missing)
        raise MissingMetricWeights(f"--metrics {metric.name} ({metric.package}) needs weights that are not in {sorted({caches[w.cache] for w in missing})} "
                                   f"and downloads are off. On a machine with network run:\n{lines}\n"
                                   "(or put them all in one folder with --cache-dir DIR and pass --metrics_dir DIR)")


# ------------------------------------------------------------------------------------------------ scorers
@lru_cache(maxsize=None)
def _chexbert(device: str):
    return _import("radeval.metrics.f1chexbert", "chexbert").F1CheXbert(device=device)


@lru_cache(maxsize=None)
def _radeval_metric(name: str):
    """A RadEval metric adapter from RadEval's own registry (loads its models once per process)."""
    registry = _import("radeval.metrics._registry", name)
    return registry.get_metric_class(name)()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def chexbert_labels(reports: list[str]) -> np.ndarray:
    """Reports x 14 binary matrix (columns in medfm's CHEXPERT_LABELS order) from CheXbert, uncertain counted as positive
    as f1chexbert / RadEval's "rrg" mode (and LLaVA-Rad's, ReXrank's tables) do."""
    scorer = _chexbert(_device())
    rows = scorer.get_labels(list(reports), mode="rrg")
    order = [scorer.TARGET_NAMES.index(name) for name in CHEXPERT_LABELS]
    return np.asarray(rows, dtype=np.int64).reshape(len(reports), -1)[:, order]


def example_f1(reference: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per-report F1 of the positive labels (2TP / (2TP + FP + FN)); 1.0 when both reports have none."""
    tp = (reference & predicted).sum(axis=1)
    wrong = (reference ^ predicted).sum(axis=1)
    return np.where(2 * tp + wrong == 0, 1.0, 2 * tp / np.maximum(2 * tp + wrong, 1))


def _chexbert_scores(hypotheses: list[str], references: list[str]) -> dict[str, np.ndarray]:
    reference, predicted = chexbert_labels(references), chexbert_labels(hypotheses)
    return {"chexbert_example_f1_14": example_f1(reference, predicted), "chexbert_reference_labels": reference, "chexbert_predicted_labels": predicted}


def _adapter_scorer(radeval_name: str, columns: dict[str, str]) -> Callable[[list[str], list[str]], dict[str, np.ndarray]]:
    """Scorer from a RadEval adapter's per-sample output: {our column: RadEval's per-sample key}."""

    def score(hypotheses: list[str], references: list[str]) -> dict[str, np.ndarray]:
        out = _radeval_metric(radeval_name).compute(list(references), list(hypotheses), per_sample=True)
        return {column: np.asarray([np.nan if v is None else v for v in out[key]], dtype=float) for column, key in columns.items()}

    return score


BERT = Weights("bert-base-uncased")
CHEXBERT = Weights(RRG_SCORERS, ("chexbert.pth",), cache="chexbert")
METRICS: dict[str, ClinicalMetric] = {m.name: m for m in (
    ClinicalMetric("chexbert", "radeval (F1CheXbert)", (CHEXBERT, BERT), _chexbert_scores, reward="chexbert_example_f1_14",
                   policy="CheXbert labels with uncertain counted as positive (f1chexbert's and RadEval's 'rrg' mode); blank and negative as negative"),
    ClinicalMetric("radgraph", "radeval (RadGraph-XL, F1RadGraph)", (Weights(RRG_SCORERS, ("radgraph-xl.tar.gz",), cache="radgraph"),),
                   _adapter_scorer("radgraph", {f"radgraph_{level}": f"radgraph_{level}" for level in ("simple", "partial", "complete")}),
                   reward="radgraph_partial"),
    ClinicalMetric("green", "radeval (GREEN)", (Weights("StanfordAIMI/GREEN-radllama2-7b"),), _adapter_scorer("green", {"green": "green"}),
                   reward="green"),
    ClinicalMetric("ratescore", "radeval (RaTEScore)", (Weights("Angelakeke/RaTE-NER-Deberta"), Weights("FremyCompany/BioLORD-2023-C")),
                   _adapter_scorer("ratescore", {"ratescore": "ratescore"}), reward="ratescore"),
    ClinicalMetric("radcliq", "radeval (RadCliQ-v1)", (Weights(RRG_SCORERS, ("radgraph.tar.gz",), cache="radgraph"), CHEXBERT, BERT,
                                                       Weights("distilroberta-base")),
                   _adapter_scorer("radcliq", {"radcliq_v1": "radcliq_v1"}), reward="radcliq_v1", higher_is_better=False,
                   policy="mean of per-report RadCliQ-v1 (RadEval and ReXrank print 1/mean)"),
)}


def require(name: str, metrics_dir: str | Path | None = None) -> ClinicalMetric:
    """The metric `name`, once its package imports and (offline) its weights are cached: else a clear error."""
    if name not in METRICS:
        raise ValueError(f"Unknown clinical metric {name!r}; choose from {sorted(METRICS)}")
    metric = METRICS[name]
    _import("radeval", name)
    with weights_from(metrics_dir, {w.cache for w in metric.weights}):
        check_weights(metric)
    return metric


def clinical_scores(name: str, hypotheses: list[str], references: list[str], metrics_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """Every per-report column metric `name` gives (arrays of one value per report; CheXbert also its label matrices)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    metric = require(name, metrics_dir)
    with weights_from(metrics_dir, {w.cache for w in metric.weights}):
        return metric.scorer(list(hypotheses), list(references))


def per_report_scores(name: str, hypotheses: list[str], references: list[str], metrics_dir: str | Path | None = None) -> list[float]:
    """One score per report for metric `name` (its reward column: CheXbert example F1, RadGraph partial F1, GREEN, RaTEScore,
    RadCliQ-v1 where lower is better): what a GRPO reward calls."""
    return [float(v) for v in clinical_scores(name, hypotheses, references, metrics_dir)[METRICS[name].reward]]
