"""Statistics of a reader study, per reader and pooled, from scipy / statsmodels / scikit-learn; results.json, answers.csv, index.html.

Turing: accuracy, true recognition rate (real judged real), false recognition rate (synthetic judged real), with Wilson CIs.
Rating: realism and plausibility by source with bootstrap CIs (and a Mann-Whitney U test), "finding present" against
the prompts' labels. Pairwise: how often each source wins, report errors by source. All designs: agreement between
readers (Cohen's kappa for two, Fleiss' kappa for more, bootstrap CIs over items) and of each reader with themself on repeats.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap, mannwhitneyu
from sklearn.metrics import cohen_kappa_score, confusion_matrix
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa
from statsmodels.stats.inter_rater import cohens_kappa as statsmodels_cohens_kappa
from statsmodels.stats.proportion import proportion_confint

from .designs import SOURCES
from .folder import load_private, load_study
from .store import store_of

POOLED = "all readers"
RESAMPLES = 2000
# The answer readers agree or disagree on, per design; Likert answers are ordinal (quadratic-weighted Cohen's kappa).
AGREEMENT_FIELD = {"turing": ("source", None), "rating": ("realism", "quadratic"), "pairwise": ("preferred", None)}


def answer_rows(folder: str | Path) -> list[dict]:
    """Every answer joined with the unblinding key: reader, position, repeat, the cases in shown order with their sources."""
    study, key = load_study(folder), load_private(folder, "key.json")
    rows = []
    for answer in store_of(folder).answers():
        entry = study["orders"][answer["reader"]][answer["position"]]
        item = study["items"][answer["item"]]
        row = {"reader": answer["reader"], "position": answer["position"], "item": answer["item"], "repeat": entry["repeat"],
               "cases": answer["cases"], "sources": [key[c]["source"] for c in answer["cases"]], "prompt": key[item["cases"][0]]["prompt"],
               "labels": key[answer["cases"][0]]["labels"], "seconds": answer["seconds"], **answer["answer"]}
        if study["design"] == "pairwise":  # which case won, in the item's own order (readers saw the sides swapped at random)
            chosen = {"A": answer["cases"][0], "B": answer["cases"][1]}.get(answer["answer"]["preference"])
            row["preferred"] = "equal" if chosen is None else str(item["cases"].index(chosen))
        rows.append(row)
    return rows


def proportion(count: int, total: int) -> dict:
    """A rate with its Wilson 95% CI (statsmodels)."""
    if total == 0:
        return {"value": None, "ci": None, "count": 0, "n": 0}
    low, high = proportion_confint(count, total, alpha=0.05, method="wilson")
    return {"value": count / total, "ci": [float(low), float(high)], "count": int(count), "n": int(total)}


def _finite(value) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def mean_with_ci(values, seed: int = 0) -> dict:
    """Mean with a percentile bootstrap 95% CI (scipy.stats.bootstrap); no CI below two values or when all are equal."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return {"mean": None, "ci": None, "n": 0}
    ci = None
    if len(values) > 1 and np.ptp(values) > 0:
        result = bootstrap((values,), np.mean, n_resamples=RESAMPLES, method="percentile", rng=np.random.default_rng(seed))
        ci = [_finite(result.confidence_interval.low), _finite(result.confidence_interval.high)]
    return {"mean": float(values.mean()), "ci": ci, "n": int(len(values))}


def _bootstrap_items(statistic, num_items: int, seed: int) -> list[float | None] | None:
    """Percentile bootstrap 95% CI of `statistic(item_indices)` over resampled items; resamples where it is undefined are dropped."""
    if num_items < 2:
        return None
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, num_items, num_items)) for _ in range(RESAMPLES)]
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)])
    # scipy.stats.bootstrap gives up when one resample is undefined (a kappa on one category), so resample here and take percentiles
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else None


def cohen_kappa(a: list, b: list, weights: str | None = None, seed: int = 0) -> dict:
    """Cohen's kappa of two raters (scikit-learn) with a bootstrap CI over items.

    Each resample's kappa comes from its contingency table through statsmodels' cohens_kappa (the same value, 30x faster
    than calling scikit-learn 2,000 times).
    """
    a, b = [str(x) for x in a], [str(x) for x in b]
    labels = sorted(set(a) | set(b))
    codes_a, codes_b = (np.asarray([labels.index(x) for x in values], dtype=int) for values in (a, b))

    def kappa(index):
        table = np.bincount(codes_a[index] * len(labels) + codes_b[index], minlength=len(labels) ** 2).reshape(len(labels), len(labels))
        with np.errstate(divide="ignore", invalid="ignore"):
            return statsmodels_cohens_kappa(table, wt=weights, return_results=False) if len(labels) > 1 else None

    value = None
    if len(a) and len(labels) > 1:
        with np.errstate(divide="ignore", invalid="ignore"):
            value = cohen_kappa_score(a, b, labels=labels, weights=weights)
    return {"kappa": _finite(value), "ci": _bootstrap_items(kappa, len(a), seed), "n": len(a), "weights": weights,
            "agreement": float(np.mean(codes_a == codes_b)) if len(a) else None}


def fleiss(table: list[list], seed: int = 0) -> dict:
    """Fleiss' kappa (statsmodels) of an items x raters table of answers, with a bootstrap CI over items."""
    table = np.asarray(table, dtype=object).astype(str)
    counts = aggregate_raters(table)[0]

    def kappa(index):
        with np.errstate(divide="ignore", invalid="ignore"):
            value = fleiss_kappa(counts[index], method="fleiss")
        return value if np.isfinite(value) else None

    return {"kappa": _finite(kappa(np.arange(len(table)))) if len(table) else None, "ci": _bootstrap_items(kappa, len(table), seed),
            "n": int(len(table)), "raters": int(table.shape[1]) if table.ndim == 2 else 0}


def inter_reader(rows: list[dict], design: str, readers: list[str], seed: int = 0) -> dict | None:
    """Agreement between readers on the items every reader answered (first showings)."""
    field, weights = AGREEMENT_FIELD[design]
    answers = defaultdict(dict)
    for row in rows:
        if not row["repeat"]:
            answers[row["item"]][row["reader"]] = row[field]
    common = sorted(item for item, by in answers.items() if len(by) == len(readers))
    if len(readers) < 2 or not common:
        return None
    if len(readers) == 2:
        return {"statistic": "Cohen's kappa", "field": field,
                **cohen_kappa([answers[i][readers[0]] for i in common], [answers[i][readers[1]] for i in common], weights, seed)}
    return {"statistic": "Fleiss' kappa", "field": field, **fleiss([[answers[i][r] for r in readers] for i in common], seed)}


def intra_reader(rows: list[dict], design: str, seed: int = 0) -> dict | None:
    """Agreement of a reader with their own earlier answer on repeated items (rows of one reader, or of all: pairs never mix readers)."""
    field, weights = AGREEMENT_FIELD[design]
    first = {(r["reader"], r["item"]): r[field] for r in rows if not r["repeat"]}
    pairs = [(first[(r["reader"], r["item"])], r[field]) for r in rows if r["repeat"] and (r["reader"], r["item"]) in first]
    if not pairs:
        return None
    return {"statistic": "Cohen's kappa", "field": field, **cohen_kappa([p[0] for p in pairs], [p[1] for p in pairs], weights, seed)}


def turing_stats(rows: list[dict]) -> dict:
    """Accuracy and recognition rates of real-or-synthetic answers (first showings)."""
    rows = [r for r in rows if not r["repeat"]]
    truth, said = [r["sources"][0] for r in rows], [r["source"] for r in rows]
    matrix = confusion_matrix(truth, said, labels=list(SOURCES)) if rows else np.zeros((2, 2), dtype=int)
    (real_real, real_synthetic), (synthetic_real, synthetic_synthetic) = matrix.tolist()
    confidence = {source: mean_with_ci([r["confidence"] for r in rows if r["sources"][0] == source]) for source in SOURCES}
    return {
        "n": len(rows),
        "accuracy": proportion(real_real + synthetic_synthetic, len(rows)),
        "true_recognition_rate": proportion(real_real, real_real + real_synthetic),  # real images judged real
        "false_recognition_rate": proportion(synthetic_real, synthetic_real + synthetic_synthetic),  # synthetic images judged real
        "confusion_matrix": {"rows: truth, columns: answer": list(SOURCES), "counts": matrix.tolist()},
        "confidence_by_source": confidence,
    }


def rating_stats(rows: list[dict], findings: list[str]) -> dict:
    """Realism and plausibility by source, and agreement of "finding present" with the prompts' labels (first showings)."""
    rows = [r for r in rows if not r["repeat"]]
    stats = {"n": len(rows)}
    for scale in ("realism", "plausibility"):
        by_source = {s: [r[scale] for r in rows if r["sources"][0] == s] for s in SOURCES}
        stats[scale] = {s: mean_with_ci(v) for s, v in by_source.items()}
        if all(by_source.values()):
            test = mannwhitneyu(by_source["real"], by_source["synthetic"], alternative="two-sided")
            stats[scale]["mann_whitney_u"] = {"statistic": float(test.statistic), "p_value": _finite(test.pvalue)}
    per_finding = {}
    for finding in findings:
        labelled = [finding in r["labels"] for r in rows if r["prompt"]]
        marked = [finding in r["findings"] for r in rows if r["prompt"]]
        per_finding[finding] = {**cohen_kappa(labelled, marked), "prompt_positive": int(sum(labelled)), "reader_marked": int(sum(marked))}
    all_labelled = [f in r["labels"] for r in rows if r["prompt"] for f in findings]
    all_marked = [f in r["findings"] for r in rows if r["prompt"] for f in findings]
    stats["findings_vs_prompt_labels"] = {"pooled": cohen_kappa(all_labelled, all_marked), "per_finding": per_finding}
    return stats


def pairwise_stats(rows: list[dict], reports: bool) -> dict:
    """How often each source wins a real-vs-synthetic pair, ties, and (reports) errors per report by source."""
    rows = [r for r in rows if not r["repeat"]]
    mixed = [r for r in rows if set(r["sources"]) == set(SOURCES)]
    real_wins = sum(r["preference"] != "equal" and r["sources"]["AB".index(r["preference"])] == "real" for r in mixed)
    stats = {"n": len(rows), "ties": proportion(sum(r["preference"] == "equal" for r in rows), len(rows)),
             "real_preferred_over_synthetic": proportion(real_wins, sum(r["preference"] != "equal" for r in mixed))}
    if reports:
        for kind in ("significant", "insignificant"):
            counts = defaultdict(list)
            for r in rows:
                for side, source in zip("ab", r["sources"]):
                    counts[source].append(r[f"{kind}_errors_{side}"])
            stats[f"{kind}_errors_per_report"] = {s: mean_with_ci(counts[s]) for s in SOURCES if counts[s]}
    return stats


def compute_results(folder: str | Path, seed: int = 0) -> dict:
    """The statistics of a study folder, per reader and pooled."""
    study = load_study(folder)
    rows = answer_rows(folder)
    design, readers = study["design"], study["readers"]

    def by_design(subset):
        if design == "turing":
            return turing_stats(subset)
        if design == "rating":
            return rating_stats(subset, study["findings"])
        return pairwise_stats(subset, study["reports"])

    groups = {**{r: [row for row in rows if row["reader"] == r] for r in readers}, POOLED: rows}
    per_reader = {name: {**by_design(subset), "answered": len(subset), "of": len(study["orders"][name]) if name != POOLED else
                         sum(len(o) for o in study["orders"].values()), "intra_reader": intra_reader(subset, design, seed)}
                  for name, subset in groups.items()}
    return {"design": design, "reports": study["reports"], "readers": readers, "per_reader": per_reader,
            "inter_reader": inter_reader(rows, design, readers, seed)}


def write_answers_csv(rows: list[dict], path: Path) -> Path:
    """The raw answers, one row each, with the unblinded sources (lists joined by '; ')."""
    columns = list(dict.fromkeys(k for row in rows for k in row)) or ["reader"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: "; ".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()} for row in rows)
    return path


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def plots(results: dict, rows: list[dict]) -> dict[str, str]:
    """Base64 PNGs: the pooled confusion matrix (turing), realism histograms by source (rating), preferences (pairwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    figures = {}
    first = [r for r in rows if not r["repeat"]]
    if results["design"] == "turing" and first:
        figure, axis = plt.subplots(figsize=(4, 3.5))
        counts = np.asarray(results["per_reader"][POOLED]["confusion_matrix"]["counts"])
        ConfusionMatrixDisplay(counts, display_labels=list(SOURCES)).plot(ax=axis, colorbar=False, cmap="Blues")
        axis.set(xlabel="Readers' answer", ylabel="Truth", title="Real or synthetic? (all readers)")
        figures["Confusion matrix"] = _png(figure)
        plt.close(figure)
    if results["design"] == "rating" and first:
        figure, axes = plt.subplots(1, 2, figsize=(8, 3), sharey=True)
        for axis, scale in zip(axes, ("realism", "plausibility")):
            for source in SOURCES:
                axis.hist([r[scale] for r in first if r["sources"][0] == source], bins=np.arange(0.5, 6.5), alpha=0.6, label=source)
            axis.set(xlabel=f"{scale} (1-5)", ylabel="answers", title=f"{scale.capitalize()} by source")
            axis.legend()
        figures["Realism and plausibility by source"] = _png(figure)
        plt.close(figure)
    if results["design"] == "pairwise" and first:
        figure, axis = plt.subplots(figsize=(5, 3))
        names = [n for n in results["per_reader"]]
        axis.bar(names, [results["per_reader"][n]["real_preferred_over_synthetic"]["value"] or 0 for n in names])
        axis.set(ylabel="share", ylim=(0, 1), title="Real preferred over synthetic")
        figures["Preferences"] = _png(figure)
        plt.close(figure)
    return figures


def write_html(results: dict, figures: dict[str, str], path: Path) -> Path:
    images = "".join(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>" for title, data in figures.items())
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>medfm reader study: results</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head>
<body><h1>Reader study ({html.escape(results['design'])}{' of reports' if results['reports'] else ''}): results</h1>
<p>Readers: {html.escape(', '.join(results['readers']))}. Rates with Wilson 95% CIs; means and kappas with bootstrap 95% CIs.</p>
<ul>{''.join(f"<li>{html.escape(line)}</li>" for line in summary(results).splitlines())}</ul>
{images}<h2>Statistics</h2><pre>{html.escape(json.dumps(results, indent=1))}</pre></body></html>""", encoding="utf-8")
    return path


def write_results(folder: str | Path, output_dir: str | Path | None = None, seed: int = 0) -> dict:
    """results.json, answers.csv and index.html in `output_dir` (default: STUDY/results); returns the results."""
    folder = Path(folder)
    output_dir = Path(output_dir or folder / "results")
    output_dir.mkdir(parents=True, exist_ok=True)
    results = compute_results(folder, seed)
    rows = answer_rows(folder)
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    write_answers_csv(rows, output_dir / "answers.csv")
    write_html(results, plots(results, rows), output_dir / "index.html")
    return results


def summary(results: dict) -> str:
    """The headline numbers, one line per reader, for the terminal."""
    lines = []
    for name, stats in results["per_reader"].items():
        if results["design"] == "turing":
            parts = [f"accuracy {_fmt(stats['accuracy'])}", f"true recognition {_fmt(stats['true_recognition_rate'])}",
                     f"false recognition {_fmt(stats['false_recognition_rate'])}"]
        elif results["design"] == "rating":
            parts = [f"realism real {_fmt(stats['realism']['real'], 'mean')} synthetic {_fmt(stats['realism']['synthetic'], 'mean')}",
                     f"findings vs prompts kappa {_fmt(stats['findings_vs_prompt_labels']['pooled'], 'kappa')}"]
        else:
            parts = [f"real preferred {_fmt(stats['real_preferred_over_synthetic'])}", f"ties {_fmt(stats['ties'])}"]
        if stats["intra_reader"]:
            parts.append(f"intra-reader kappa {_fmt(stats['intra_reader'], 'kappa')}")
        lines.append(f"{name} ({stats['answered']}/{stats['of']} answered): " + ", ".join(parts))
    if results["inter_reader"]:
        lines.append(f"inter-reader {results['inter_reader']['statistic']} on {results['inter_reader']['field']}: {_fmt(results['inter_reader'], 'kappa')}"
                     f" over {results['inter_reader']['n']} items")
    return "\n".join(lines)


def _fmt(stat: dict, key: str = "value") -> str:
    value = stat.get(key) if stat else None
    if value is None:
        return "n/a"
    ci = stat.get("ci")
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else "")
