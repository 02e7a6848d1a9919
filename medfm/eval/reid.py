"""Patient re-identification scores between generated and training radiographs, with a user's Siamese network.

CheXGenBench audits privacy with the Siamese re-identification network of Packhäuser et al. (2022): two radiographs
in, one logit out, sigmoid > 0.5 meaning "same patient". medfm runs any such pair network given as a folder:

    reid/
      reid_model.pt       TorchScript module: forward(images_a, images_b) -> (N,) or (N, 1) same-patient logits
                          (or reid_model.pt2: the same as a torch.export program with a dynamic batch dimension)
      reid_config.json    optional; defaults are Packhäuser's/CheXGenBench's preprocessing:
                          {"image_size": 224, "channels": 3, "mean": [0, 0, 0], "std": [1, 1, 1],
                           "output": "logits", "threshold": 0.5}

Inputs are float (N, channels, image_size, image_size) in [0, 1], then (x - mean) / std; "output": "probabilities"
for a network that applies the sigmoid itself. To convert Packhäuser's ResNet-50 SiameseNetwork checkpoint:

    model = SiameseNetwork(network="ResNet-50", in_channels=3, n_features=128)
    model.load_state_dict(torch.load("ResNet-50_epoch11_data_handling_RPN.pth", map_location="cpu"))
    example = torch.rand(2, 3, 224, 224)
    torch.jit.trace(model.eval(), (example, example)).save("reid/reid_model.pt")
    # or, since TorchScript is deprecated in recent torch:
    batch = torch.export.Dim("batch")
    program = torch.export.export(model.eval(), (example, example), dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, "reid/reid_model.pt2")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torchvision.transforms import v2
from tqdm.auto import tqdm

REID_MODEL_NAME, REID_EXPORTED_NAME, REID_CONFIG_NAME = "reid_model.pt", "reid_model.pt2", "reid_config.json"
REID_DEFAULTS = {"image_size": 224, "channels": 3, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "output": "logits", "threshold": 0.5}


class ReidentificationModel:
    """A pair network loaded from a `reid_model.pt` + `reid_config.json` folder (see the module docstring)."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        folder = Path(folder)
        scripted, exported = folder / REID_MODEL_NAME, folder / REID_EXPORTED_NAME
        if not scripted.is_file() and not exported.is_file():
            raise FileNotFoundError(f"--reid_model {folder}: no {REID_MODEL_NAME} or {REID_EXPORTED_NAME} there; save your Siamese network with "
                                    f"torch.jit.trace(model, (x, x)).save('{folder}/{REID_MODEL_NAME}') (see medfm/eval/reid.py)")
        config_path = folder / REID_CONFIG_NAME
        given = json.loads(config_path.read_text()) if config_path.is_file() else {}
        unknown = set(given) - set(REID_DEFAULTS)
        if unknown:
            raise ValueError(f"{config_path}: unknown keys {sorted(unknown)}; expected some of {sorted(REID_DEFAULTS)}")
        self.config = {**REID_DEFAULTS, **given}
        if self.config["output"] not in ("logits", "probabilities"):
            raise ValueError(f"{config_path}: output must be 'logits' or 'probabilities', not {self.config['output']!r}")
        self.folder, self.device = folder, torch.device(device)
        if exported.is_file():
            self.network = torch.export.load(str(exported)).module().to(self.device)
        else:
            self.network = torch.jit.load(str(scripted), map_location=self.device).eval()
        channels = self.config["channels"]
        self.mean = torch.tensor(self.config["mean"][:channels], device=self.device).view(1, channels, 1, 1)
        self.std = torch.tensor(self.config["std"][:channels], device=self.device).view(1, channels, 1, 1)

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> the network's input: resized (bilinear, antialiased), [0, 1], channels, normalised."""
        size = self.config["image_size"]
        x = v2.functional.resize(images.to(self.device).float() / 255, [size, size], antialias=True).clamp(0, 1)
        return (x[:, : self.config["channels"]] - self.mean) / self.std

    @torch.no_grad()
    def score(self, images_a: torch.Tensor, images_b: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Same-patient probability of each pair (images_a[i], images_b[i]), uint8 (N, 3, H, W) each -> (N,)."""
        scores = []
        for start in tqdm(range(0, len(images_a), batch_size), desc="Re-identification", unit="batch"):
            out = self.network(self.preprocess(images_a[start : start + batch_size]), self.preprocess(images_b[start : start + batch_size]))
            out = out.reshape(-1).float()
            scores.append((torch.sigmoid(out) if self.config["output"] == "logits" else out).cpu())
        return torch.cat(scores)
