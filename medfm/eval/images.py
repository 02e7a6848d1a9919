"""Image metrics for generated radiographs: FID/KID and precision/recall/density/coverage on the features of every
extractor named, MS-SSIM diversity, image–text alignment, a memorization and re-identification audit, HTML report.

Images travel as uint8 tensors (N, 3, H, W); feature extractors (medfm.eval.features) map them to (N, D) floats.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import itertools
import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance  # torchmetrics.image exports these only with torch-fidelity
from torchmetrics.image.kid import KernelInceptionDistance
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ..data.images import radiograph_files, read_radiograph, to_rgb_tensor
from ..data.pairs import read_table
from .features import extract_features, extractor_keys, feature_extractor
from .reid import ReidentificationModel

logger = logging.getLogger(__name__)

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, torchmetrics' default


# ----------------------------------------------------------------------------------------------------------
# Loading


def to_uint8_rgb(array: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) [0, 1] -> uint8 (3, size, size): short side resized to `size`, centre-cropped (as in training)."""
    return ((to_rgb_tensor(array, size) + 1) * 127.5).round().to(torch.uint8)


def _folder_prompts(folder: Path, files: list[Path]) -> list[str] | None:
    """Prompts from `metadata.jsonl` (`text` or `prompt` column), aligned with `files`; None without one for each."""
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        return None
    by_name = {row["file_name"]: row.get("text", row.get("prompt")) for row in read_table(metadata) if "file_name" in row}
    prompts = [by_name.get(file.name) for file in files]
    if any(prompt is None for prompt in prompts):
        logger.warning("%s: metadata.jsonl lacks a text/prompt for some images; prompts ignored", metadata)
        return None
    return prompts


def load_image_folder(folder: str | Path, size: int) -> tuple[torch.Tensor, list[str] | None]:
    """Every radiograph in `folder` as uint8 (N, 3, size, size), and its prompts when metadata.jsonl has them."""
    folder = Path(folder)
    files = radiograph_files(folder)
    images = torch.stack([to_uint8_rgb(read_radiograph(f), size) for f in tqdm(files, desc=f"Reading {folder.name}", unit="img")])
    return images, _folder_prompts(folder, files)


class _Precomputed(nn.Module):
    """Identity "extractor" so torchmetrics' FID/KID consume features computed once."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


# ----------------------------------------------------------------------------------------------------------
# Metrics


def _as_features(images_or_features: torch.Tensor, extractor: nn.Module | None, batch_size: int) -> torch.Tensor:
    if images_or_features.ndim == 2:
        return images_or_features.double()
    if extractor is None:
        raise ValueError("Images were given without an extractor; pass extractor= or precomputed (N, D) features")
    return extract_features(images_or_features, extractor, batch_size).double()


def fid_kid(
    real: torch.Tensor,
    generated: torch.Tensor,
    extractor: nn.Module | None = None,
    subsets: int = 100,
    subset_size: int = 1000,
    batch_size: int = 32,
) -> dict[str, float]:
    """FID and KID (torchmetrics) between uint8 images (N, 3, H, W) or precomputed (N, D) features.

    `subset_size` is capped at half the smaller set, so the subsets differ and the KID std means something.
    """
    real_features = _as_features(real, extractor, batch_size)
    fake_features = _as_features(generated, extractor, batch_size)
    identity = _Precomputed(real_features.shape[1])
    fid = FrechetInceptionDistance(feature=identity)
    size = max(2, min(subset_size, len(real_features) // 2, len(fake_features) // 2))
    kid = KernelInceptionDistance(feature=identity, subsets=subsets, subset_size=size)
    for metric in (fid, kid):
        metric.update(real_features, real=True)
        metric.update(fake_features, real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


def ms_ssim_settings(size: int) -> dict:
    """MS-SSIM kernel and scales that fit `size` px: the standard 5 scales with an 11-px kernel from 176 px,
    below that the first 3 scales (weights renormalised to sum to 1) with a 7-px kernel, which torchmetrics
    accepts from 28 px (its rule: size // (scales - 1)**2 > kernel_size - 1).
    """
    if size // 16 > 10:
        return {"kernel_size": 11, "betas": MS_SSIM_BETAS}
    betas = MS_SSIM_BETAS[:3]
    return {"kernel_size": 7, "betas": tuple(b / sum(betas) for b in betas)}


def _gray(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) radiographs -> float (N, 1, H, W) in [0, 1] (channels are copies)."""
    return images[:, :1].float() / 255


def pairwise_ms_ssim(images: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of every unordered pair of images (N >= 2)."""
    first, second = zip(*itertools.combinations(range(len(images)), 2))
    gray = _gray(images)
    return multiscale_structural_similarity_index_measure(
        gray[list(first)], gray[list(second)], data_range=1.0, reduction="none", **ms_ssim_settings(min(gray.shape[-2:]))
    )


def ms_ssim_diversity(images_by_prompt: dict[str, torch.Tensor]) -> dict:
    """Mean pairwise MS-SSIM among samples of the same prompt (RoentGen: 4 per prompt); lower = more diverse.

    Prompts with fewer than 2 samples are skipped; "mean" averages over prompts.
    """
    per_prompt = {
        prompt: float(pairwise_ms_ssim(images).mean())
        for prompt, images in tqdm(images_by_prompt.items(), desc="MS-SSIM diversity", unit="prompt")
        if len(images) >= 2
    }
    return {"per_prompt": per_prompt, "mean": float(np.mean(list(per_prompt.values()))) if per_prompt else float("nan")}


def precision_recall_density_coverage(real_features: torch.Tensor, fake_features: torch.Tensor, nearest_k: int = 5) -> dict:
    """Precision, recall, density and coverage (Naeem et al. 2020) of (N, D) features, computed by the `prdc` package.

    `nearest_k` is capped at the smaller set's size - 2 (prdc's limit; with a warning); the value used is returned as "nearest_k".
    """
    try:
        from prdc import compute_prdc
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("Precision/recall/density/coverage need the prdc package: pip install prdc (or medfm[eval])") from err
    k = min(nearest_k, len(real_features) - 2, len(fake_features) - 2)
    if k < 1:
        raise ValueError(f"PRDC needs at least 3 real and 3 generated images (got {len(real_features)} and {len(fake_features)})")
    if k < nearest_k:
        logger.warning("PRDC: only %d real / %d generated images, so k = %d instead of %d", len(real_features), len(fake_features), k, nearest_k)
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        values = compute_prdc(real_features.double().numpy(), fake_features.double().numpy(), k)
    return {name: float(value) for name, value in values.items()} | {"nearest_k": k}


def image_text_alignment(images: torch.Tensor, prompts: list[str], model: str | nn.Module, batch_size: int = 32) -> dict:
    """Image–text alignment of generated images with their prompts under any CLIP-like model: an open_clip spec
    (BiomedCLIP: "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"), a transformers CLIP/SigLIP
    id or folder, or a built extractor with `encode_text`.

    "clip_score" is torchmetrics' definition, mean max(100 * cos(image, text), 0); "mean_cosine" is the plain mean
    cosine (CheXGenBench's BioViL-T alignment score is this with BioViL-T).
    """
    network = feature_extractor(model) if isinstance(model, str) else model
    if not hasattr(network, "encode_text"):
        raise ValueError(f"{model}: image-text alignment needs a CLIP-like model with a text tower (open_clip or transformers CLIP/SigLIP)")
    image_features = nn.functional.normalize(extract_features(images, network, batch_size, desc="Alignment: images"), dim=-1)
    text_features = torch.cat([network.encode_text(prompts[i : i + batch_size]).float().cpu() for i in range(0, len(prompts), batch_size)])
    cosine = (image_features * text_features).sum(-1)
    return {"clip_score": float((100 * cosine).clamp(min=0).mean()), "mean_cosine": float(cosine.mean())}


def nearest_training_features(generated: torch.Tensor, training: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per generated feature vector: the nearest training vector by cosine ("index", "cosine"), and the smallest
    Euclidean distance to any training vector over sqrt(D) ("distance": CheXGenBench's latent distance, normalised)."""
    gen, train = generated.float(), training.float()
    unit_train = nn.functional.normalize(train, dim=-1)
    best = [(chunk @ unit_train.T).max(dim=1) for chunk in torch.split(nn.functional.normalize(gen, dim=-1), 1024)]
    distance = torch.cat([torch.cdist(chunk, train).min(dim=1).values for chunk in torch.split(gen, 1024)]) / math.sqrt(gen.shape[1])
    return {"index": torch.cat([b.indices for b in best]), "cosine": torch.cat([b.values for b in best]), "distance": distance}


def nearest_training_pixels(generated: torch.Tensor, training: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per generated image: the nearest training image in pixel space ("index") and its root-mean-square intensity
    distance on a [0, 1] scale ("distance"), at the evaluation resolution."""
    gen, train = _gray(generated).flatten(1), _gray(training).flatten(1)
    best = [torch.cdist(chunk, train).min(dim=1) for chunk in torch.split(gen, 256)]
    return {"index": torch.cat([b.indices for b in best]), "distance": torch.cat([b.values for b in best]) / math.sqrt(gen.shape[1])}


def memorization_audit(
    generated: torch.Tensor,
    training: torch.Tensor,
    extractor: nn.Module | None = None,
    threshold: float = 0.97,
    k: int = 8,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
    batch_size: int = 32,
    reid: ReidentificationModel | None = None,
) -> dict:
    """The nearest training image of every generated image, seen three ways (as CheXGenBench's privacy metrics are):

    - feature space: nearest by cosine, the near-copy rate (cosine > `threshold`), the pair's pixel SSIM, the
      nearest feature distance;
    - pixel space: the nearest training image by pixel distance and that distance;
    - re-identification (with `reid`): the Siamese network's same-patient probability for each generated image and
      its feature-nearest training image; mean, max and the share above the network's threshold.

    `features` = (generated, training) features skips extraction. "worst" lists the k pairs of highest cosine.
    Calibrate `threshold` on your data: with Inception features, distinct 64-px phantoms already reach 0.95.
    """
    gen_f, train_f = features or (extract_features(generated, extractor, batch_size), extract_features(training, extractor, batch_size))
    nearest = nearest_training_features(gen_f, train_f)
    cosine, index = nearest["cosine"], nearest["index"]
    ssim = structural_similarity_index_measure(_gray(generated), _gray(training[index]), data_range=1.0, reduction="none")
    pixels = nearest_training_pixels(generated, training)
    audit = {
        "threshold": threshold,
        "near_copy_rate": float((cosine > threshold).float().mean()),
        "mean_nearest_cosine": float(cosine.mean()),
        "mean_nearest_feature_distance": float(nearest["distance"].mean()),
        "mean_nearest_ssim": float(ssim.mean()),
        "nearest_index": index.tolist(),
        "nearest_cosine": cosine.tolist(),
        "nearest_ssim": ssim.tolist(),
        "pixel": {"mean_nearest_distance": float(pixels["distance"].mean()), "min_nearest_distance": float(pixels["distance"].min()),
                  "nearest_index": pixels["index"].tolist(), "nearest_distance": pixels["distance"].tolist()},
    }
    worst = torch.argsort(cosine, descending=True)[:k].tolist()
    audit["worst"] = [{"generated": i, "training": int(index[i]), "cosine": float(cosine[i]), "ssim": float(ssim[i])} for i in worst]
    if reid is not None:
        scores = reid.score(generated, training[index], batch_size)
        audit["reid"] = {"model": str(reid.folder), "threshold": reid.threshold, "mean_score": float(scores.mean()), "max_score": float(scores.max()),
                         "share_above_threshold": float((scores > reid.threshold).float().mean()), "scores": scores.tolist()}
        for pair in audit["worst"]:
            pair["reid_score"] = float(scores[pair["generated"]])
    return audit


# ----------------------------------------------------------------------------------------------------------
# Report


def _png_data_uri(images: torch.Tensor, nrow: int = 8) -> str:
    """A grid of uint8 images as an embeddable PNG data URI."""
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img(images: torch.Tensor, nrow: int = 8) -> str:
    return f'<img src="{_png_data_uri(images, nrow)}">'


FEATURE_COLUMNS = ("fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage")


def _feature_table(by_extractor: dict) -> list[str]:
    """One row per extractor: FID, KID, PRDC and, with a training folder, its nearest-neighbour view."""
    memorized = any("memorization" in entry for entry in by_extractor.values())
    extra = ("near-copy rate", "mean nearest cosine", "mean nearest feature distance") if memorized else ()
    rows = ["<h2>Feature-space metrics (one row per extractor)</h2><table><tr><th>extractor</th><th>features</th>"
            + "".join(f"<th>{html.escape(name)}</th>" for name in (*FEATURE_COLUMNS, *extra)) + "</tr>"]
    for key, entry in by_extractor.items():
        cells = [f"{entry[name]:.4f}" for name in FEATURE_COLUMNS]
        if memorized:
            audit = entry["memorization"]
            cells += [f"{audit['near_copy_rate']:.3f}", f"{audit['mean_nearest_cosine']:.4f}", f"{audit['mean_nearest_distance']:.4f}"]
        rows.append(f"<tr><th title='{html.escape(entry['spec'])}'>{html.escape(key)}</th><td>{entry['num_features']}-d, PRDC k={entry['nearest_k']}</td>"
                    + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return [*rows, "</table>"]


def _memorization_section(memorization: dict, generated: torch.Tensor, training: torch.Tensor) -> list[str]:
    pixel, reid = memorization["pixel"], memorization.get("reid")
    parts = [f"<h2>Memorization ({html.escape(memorization['extractor'])} features): near-copy rate {memorization['near_copy_rate']:.3f} "
             f"(cosine &gt; {memorization['threshold']})</h2>",
             f"<p>Nearest training image in pixel space: mean RMS distance {pixel['mean_nearest_distance']:.4f}, smallest "
             f"{pixel['min_nearest_distance']:.4f} (intensity in [0, 1]).</p>"]
    if reid:
        parts.append(f"<p>Re-identification ({html.escape(reid['model'])}): mean score {reid['mean_score']:.3f}, max {reid['max_score']:.3f}, "
                     f"{reid['share_above_threshold']:.1%} of generated images above {reid['threshold']}.</p>")
    parts.append("<table><tr><th>generated | nearest training</th><th>cosine</th><th>SSIM</th>" + ("<th>re-ID score</th>" if reid else "") + "</tr>")
    for pair in memorization["worst"]:
        both = torch.stack([generated[pair["generated"]], training[pair["training"]]])
        parts.append(f"<tr><td>{_img(both, 2)}<br>#{pair['generated']} | #{pair['training']}</td><td>{pair['cosine']:.4f}</td>"
                     f"<td>{pair['ssim']:.4f}</td>" + (f"<td>{pair['reid_score']:.4f}</td>" if reid else "") + "</tr>")
    return [*parts, "</table>"]


def render_report(metrics: dict, real: torch.Tensor, generated: torch.Tensor, training: torch.Tensor | None, num_samples: int = 16) -> str:
    """A self-contained HTML page: metrics per extractor, alignment, real vs generated grids, diversity table,
    memorization (worst pairs side by side)."""
    scalars = {key: value for key, value in metrics.items() if not isinstance(value, dict)}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>medfm image evaluation</title>",
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px 8px}table{border-collapse:collapse}</style></head><body>",
        "<h1>Image evaluation</h1><table>",
        *(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>" for key, value in scalars.items()),
        "</table>",
        *_feature_table(metrics["features"]),
    ]
    alignment = metrics.get("alignment")
    if alignment:
        parts.append(f"<h2>Image–text alignment ({html.escape(alignment['model'])}): CLIP score {alignment['clip_score']:.2f}, "
                     f"mean cosine {alignment['mean_cosine']:.4f}</h2>")
    parts += ["<h2>Real samples</h2>", _img(real[:num_samples]), "<h2>Generated samples</h2>", _img(generated[:num_samples])]
    diversity = metrics.get("ms_ssim_diversity")
    if diversity:
        parts += [f"<h2>Diversity (mean pairwise MS-SSIM per prompt, lower = more diverse): {diversity['mean']:.4f}</h2>",
                  "<table><tr><th>prompt</th><th>MS-SSIM</th></tr>"]
        parts += [f"<tr><td>{html.escape(p)}</td><td>{v:.4f}</td></tr>" for p, v in sorted(diversity["per_prompt"].items(), key=lambda kv: -kv[1])]
        parts.append("</table>")
    memorization = metrics.get("memorization")
    if memorization and training is not None:
        parts += _memorization_section(memorization, generated, training)
    parts.append("</body></html>")
    return "\n".join(parts)


def _group_by_prompt(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[prompt].append(i)
    return {prompt: images[indices] for prompt, indices in groups.items()}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_image_folders(
    real_dir: str | Path,
    generated_dir: str | Path,
    output_dir: str | Path,
    size: int = 128,
    extractors: str | list[str] = "inception",
    training_dir: str | Path | None = None,
    clip_model: str | None = None,
    reid_model: str | Path | None = None,
    nearest_k: int = 5,
    threshold: float = 0.97,
    device: str | None = None,
    batch_size: int = 32,
) -> dict:
    """Run every metric that applies, write `metrics.json` and `index.html` into `output_dir`, return the metrics.

    For every extractor spec (see medfm.eval.features), under its clean name in "features": FID, KID and PRDC (k =
    `nearest_k`), and with `training_dir` its nearest-training-image view. The first extractor's FID/KID are also at
    the top level ("fid", "kid_mean", "kid_std", "extractor"), and its neighbours pair images in the memorization
    audit. MS-SSIM diversity when generated prompts repeat; alignment with `clip_model` and prompts; the
    re-identification audit with `reid_model` and `training_dir`.
    """
    specs = [extractors] if isinstance(extractors, str) else list(extractors)
    if reid_model is not None and training_dir is None:
        raise ValueError("--reid_model scores generated images against training images: give --training_dir too")
    device = device or _default_device()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    real, _ = load_image_folder(real_dir, size)
    generated, prompts = load_image_folder(generated_dir, size)
    training = load_image_folder(training_dir, size)[0] if training_dir is not None else None
    keys = extractor_keys(specs)
    metrics: dict = {"num_real": len(real), "num_generated": len(generated), "size": size, "extractor": keys[0], "features": {}}
    first_features = None
    for key, spec in zip(keys, specs):
        network = feature_extractor(spec, device)
        real_f, gen_f = (extract_features(images, network, batch_size, desc=f"{key}: {name}") for name, images in (("real", real), ("generated", generated)))
        entry = {"spec": spec, "num_features": int(real_f.shape[1]), **fid_kid(real_f, gen_f), **precision_recall_density_coverage(real_f, gen_f, nearest_k)}
        if training is not None:
            train_f = extract_features(training, network, batch_size, desc=f"{key}: training")
            nearest = nearest_training_features(gen_f, train_f)
            entry["memorization"] = {"near_copy_rate": float((nearest["cosine"] > threshold).float().mean()), "threshold": threshold,
                                     "mean_nearest_cosine": float(nearest["cosine"].mean()), "mean_nearest_distance": float(nearest["distance"].mean())}
            first_features = first_features or (gen_f, train_f)
        metrics["features"][key] = entry
        del network
    metrics.update({name: metrics["features"][keys[0]][name] for name in ("fid", "kid_mean", "kid_std")})
    if prompts:
        diversity = ms_ssim_diversity(_group_by_prompt(generated, prompts))
        if diversity["per_prompt"]:
            metrics["ms_ssim_diversity"] = diversity
        if clip_model:
            metrics["alignment"] = {"model": extractor_keys([clip_model])[0], "spec": clip_model,
                                    **image_text_alignment(generated, prompts, feature_extractor(clip_model, device), batch_size)}
    elif clip_model:
        logger.warning("%s has no prompts (metadata.jsonl with text/prompt): image-text alignment skipped", generated_dir)
    if training is not None:
        reid = ReidentificationModel(reid_model, device) if reid_model is not None else None
        metrics["memorization"] = {"extractor": keys[0], **memorization_audit(generated, training, threshold=threshold, features=first_features,
                                                                             batch_size=batch_size, reid=reid)}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (output_dir / "index.html").write_text(render_report(metrics, real, generated, training), encoding="utf-8")
    return metrics
