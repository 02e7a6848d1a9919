"""Text metrics for generated reports (torchmetrics implementations)."""

from __future__ import annotations

from torchmetrics.functional.text import bleu_score, rouge_score


def quick_report_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU-4 and mean ROUGE-L F1 on lower-cased text: cheap enough to run during training."""
    predictions = [p.lower() for p in predictions]
    references = [r.lower() for r in references]
    bleu = bleu_score(predictions, [[r] for r in references], n_gram=4)
    rouge = rouge_score(predictions, references, rouge_keys="rougeL")["rougeL_fmeasure"]
    return {"bleu4": float(bleu), "rougeL": float(rouge)}
