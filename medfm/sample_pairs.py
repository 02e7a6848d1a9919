"""Preference pairs from an adapter's own samples (`medfm pairs`): sample N reports per study, score them against the study's
reference with a reward, keep the best vs the worst where they differ by at least a margin; written in TRL's JSONL format
for `--method dpo`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import DEFAULT_REWARD
from .data.preferences import write_preference_pairs
from .data.report_batches import full_instruction
from .data.studies import ReportStudyDataset, load_studies
from .generate import adapter_training_config, generate_reports, load_report_model
from .rewards import Reward


def _image_paths(study, images, folder: Path) -> list[str]:
    """The study's image files; images held as bytes (a `datasets` table) are written as PNGs into `folder`."""
    paths = []
    for i, (source, image) in enumerate(zip(study.images, images)):
        if isinstance(source, str):
            paths.append(str(Path(source).resolve()))
        else:
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{study.row_id}-{i}.png")
            paths.append(str((folder / f"{study.row_id}-{i}.png").resolve()))
    return paths


def make_preference_pairs(adapter: str, output: str | Path, num_samples: int = 4, reward: dict[str, float] | None = None,
                          margin: float = 0.1, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0,
                          batch_size: int = 8, max_studies: int | None = None, split: str = "train", **source) -> dict:
    """Write the pairs to `output` and return counts. `source`: load_studies' keys (train_data_dir, train_data_file, ...,
    phantom_num_images); the instruction and report section are the adapter's."""
    if num_samples < 2:
        raise ValueError("--num_samples must be at least 2 (a pair needs two reports)")
    config = adapter_training_config(adapter)
    scorer = Reward(reward or DEFAULT_REWARD)
    model, processor, family = load_report_model(adapter)
    studies = load_studies(split=split, **source)[:max_studies]
    dataset = ReportStudyDataset(studies, config["report_section"], config["max_images_per_study"] if family.supports_multiple_images else 1)
    torch.manual_seed(seed)
    rows, skipped = [], 0
    for start in tqdm(range(0, len(dataset), batch_size), desc="Sampling reports", unit="batch"):
        items = [(i, dataset[i]) for i in range(start, min(start + batch_size, len(dataset)))]
        indices, examples = [i for i, e in items if "bad_row" not in e], [e for _, e in items if "bad_row" not in e]
        samples = generate_reports(model, processor, family, [e["images"] for e in examples],
                                   [full_instruction(config["instruction"], e["indication"]) for e in examples], batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, show_progress=False, do_sample=True, temperature=temperature, top_p=top_p,
                                   top_k=0, num_return_sequences=num_samples)
        # One call for the whole batch: a term such as clinical_micro scores each report against all those scored with it.
        batch_scores = scorer(samples, [e["report"] for e in examples for _ in range(num_samples)],
                              [e["images"] for e in examples for _ in range(num_samples)]).total
        for index, example in enumerate(examples):
            reports = samples[index * num_samples : (index + 1) * num_samples]
            scores = batch_scores[index * num_samples : (index + 1) * num_samples]
            best, worst = max(range(num_samples), key=scores.__getitem__), min(range(num_samples), key=scores.__getitem__)
            if scores[best] - scores[worst] < margin or reports[best] == reports[worst]:
                skipped += 1
                continue
            study = dataset.rows[indices[index]][0]
            rows.append({"id": example["row_id"], "images": _image_paths(study, example["images"], Path(output).with_suffix("") / "images"),
                         "prompt": full_instruction(config["instruction"], example["indication"]), "chosen": reports[best],
                         "rejected": reports[worst], "chosen_reward": scores[best], "rejected_reward": scores[worst]})
    write_preference_pairs(rows, output)
    return {"pairs": len(rows), "below_margin": skipped, "studies": len(dataset), "bad_rows": len(dataset.quarantine.rows),
            "reward": scorer.describe()}
