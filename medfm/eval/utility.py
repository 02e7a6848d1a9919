"""Task-level checks of synthetic radiographs with a small classifier trained on real labelled images.

- conditioning accuracy: does the classifier find, in generated images, the finding their prompt asked for?
- downstream utility: the same classifier trained on real vs real + synthetic, per-label AUC on held-out real images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchmetrics.functional.classification import multilabel_auroc
from tqdm.auto import tqdm

from ..data.images import read_radiograph, to_rgb_tensor
from ..data.pairs import load_pairs
from .labeler import label_report

DEFAULT_LABELS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Consolidation", "Lung Lesion", "Support Devices")


def load_labelled_folder(folder: str | Path, labels: list[str], size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, size, size) in [-1, 1] and a 0/1 label matrix from an imagefolder.

    Label columns (1 = positive, anything else negative) are used when present; otherwise the labels are
    read from the `text` (the prompt) with medfm's CheXpert labeler.
    """
    pairs = load_pairs(train_data_dir=str(folder))
    images, targets = [], []
    for pair in tqdm(pairs, desc=f"Reading {Path(folder).name}", unit="img"):
        images.append(to_rgb_tensor(read_radiograph(pair.image), size))
        from_text = label_report(pair.report or "") if any(name not in pair.metadata for name in labels) else {}
        row = [pair.metadata.get(name, from_text.get(name)) for name in labels]
        targets.append([float(value in (1, 1.0, "1", "1.0")) for value in row])
    return torch.stack(images), torch.tensor(targets)


def train_classifier(images: torch.Tensor, targets: torch.Tensor, epochs: int = 8, batch_size: int = 32, seed: int = 0) -> torch.nn.Module:
    """A ResNet-18 (random init, torchvision) trained as a multi-label classifier with AdamW."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=targets.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(epochs), desc="Training classifier", unit="epoch"):
        for index in torch.randperm(len(images), generator=generator).split(batch_size):
            loss = F.binary_cross_entropy_with_logits(model(images[index]), targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([torch.sigmoid(model(batch)) for batch in images.split(batch_size)])


def per_label_auc(probabilities: torch.Tensor, targets: torch.Tensor, labels: list[str]) -> dict[str, float | None]:
    """AUC per label; None where the held-out split has only one class of that label."""
    aucs = multilabel_auroc(probabilities, targets.long(), num_labels=len(labels), average=None)
    return {name: (float(auc) if 0 < targets[:, i].sum() < len(targets) else None) for i, (name, auc) in enumerate(zip(labels, aucs))}


def split_holdout(count: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    cut = int(round(count * fraction))
    return order[cut:], order[:cut]


def evaluate_utility(real_dir: str | Path, synthetic_dir: str | Path, labels: list[str] = DEFAULT_LABELS, size: int = 64,
                     epochs: int = 8, holdout: float = 0.3, seed: int = 0) -> dict:
    """Conditioning accuracy of `synthetic_dir` and downstream AUCs (real vs real + synthetic) on a held-out real split."""
    labels = list(labels)
    real_images, real_targets = load_labelled_folder(real_dir, labels, size)
    synthetic_images, synthetic_targets = load_labelled_folder(synthetic_dir, labels, size)
    train, test = split_holdout(len(real_images), holdout, seed)
    real_only = train_classifier(real_images[train], real_targets[train], epochs, seed=seed)
    augmented = train_classifier(torch.cat([real_images[train], synthetic_images]), torch.cat([real_targets[train], synthetic_targets]),
                                 epochs, seed=seed)
    synthetic_probabilities = predict(real_only, synthetic_images)
    conditioning = {}
    for i, name in enumerate(labels):
        asked = synthetic_targets[:, i] == 1
        conditioning[name] = {"prompts_asking": int(asked.sum()),
                              "detected_when_asked": float((synthetic_probabilities[asked, i] > 0.5).float().mean()) if asked.any() else None,
                              "detected_when_not_asked": float((synthetic_probabilities[~asked, i] > 0.5).float().mean()) if (~asked).any() else None}
    return {
        "labels": labels,
        "conditioning_accuracy": conditioning,
        "auc_real": per_label_auc(predict(real_only, real_images[test]), real_targets[test], labels),
        "auc_real_plus_synthetic": per_label_auc(predict(augmented, real_images[test]), real_targets[test], labels),
        "notes": {"classifier": f"torchvision ResNet-18, random init, {epochs} epochs, {size} px, AdamW lr 1e-3, seed {seed}",
                  "split": f"{len(train)} real for training, {len(test)} held-out real for AUC; {len(synthetic_images)} synthetic",
                  "labels": "label columns when present, else medfm's CheXpert labeler on the prompt; uncertain counts as negative"},
    }


def mean_auc(aucs: dict[str, float | None]) -> float | None:
    values = [v for v in aucs.values() if v is not None]
    return float(np.mean(values)) if values else None


def write_utility(result: dict, output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "utility.json"
    path.write_text(json.dumps(result, indent=2))
    return path
