"""Backbones for `medfm eval images` (transformers and open_clip folders, several at once), PRDC, degraded images,
and the re-identification hook — on tiny models built from configs and saved as folders."""

import json

import numpy as np
import prdc
import pytest
import safetensors.torch
import torch
from torch import nn
from torchvision.transforms import v2
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, SiglipConfig, SiglipImageProcessor, SiglipModel

from medfm.cli import main as medfm
from medfm.data.phantom import write_phantom_dataset
from medfm.eval.features import InceptionFeatures, OpenClipImageFeatures, TransformersImageFeatures, extract_features, extractor_keys, feature_extractor
from medfm.eval.images import fid_kid, image_text_alignment, load_image_folder, memorization_audit, precision_recall_density_coverage
from medfm.eval.reid import ReidentificationModel
from medfm.hub import _summary
from medfm.models.tokenizers import clip_tokenizer

SIZE = 64
TINY_VISION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 8}
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def images(phantom_folders):
    """Two phantom imagefolders of different seeds (conftest.py): {name: (folder, uint8 images, prompts)}."""
    return phantom_folders(16)


@pytest.fixture(scope="module")
def rad_dino_folder(tmp_path_factory):
    """A tiny Dinov2 saved with RAD-DINO's processor type (BitImageProcessor) and its intensity statistics."""
    folder = tmp_path_factory.mktemp("tiny-rad-dino")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**TINY_VISION)).save_pretrained(folder)
    processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5307] * 3, image_std=[0.2583] * 3)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    """A tiny SigLIP (image and text towers) with its image processor and an offline CLIP BPE tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-siglip")
    tokenizer = clip_tokenizer(num_merges=500, model_max_length=16)
    text = {key: TINY_VISION[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
    config = SiglipConfig(text_config={**text, "vocab_size": len(tokenizer), "max_position_embeddings": 16}, vision_config=TINY_VISION)
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory):
    """A tiny open_clip model in the layout of Hub open_clip repos such as BiomedCLIP (open_clip_config.json + weights)."""
    import open_clip

    folder = tmp_path_factory.mktemp("tiny-biomedclip")
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic", "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": preprocess}))
    torch.manual_seed(0)
    model = open_clip.create_model("local-dir:" + str(folder), load_weights=False)
    safetensors.torch.save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    return folder


class PixelSiamese(nn.Module):
    """A stand-in pair network with Packhäuser's interface: same-patient logit from two images (identical -> high)."""

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return (8 - 80 * (first - second).abs().mean(dim=(1, 2, 3))).unsqueeze(1)


@pytest.fixture(scope="module")
def reid_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reid")
    example = torch.rand(1, 1, 48, 48)
    torch.jit.trace(PixelSiamese(), (example, example)).save(str(folder / "reid_model.pt"))
    (folder / "reid_config.json").write_text(json.dumps({"image_size": 48, "channels": 1, "mean": [0.5], "std": [0.5]}))
    return folder


def test_extractor_keys_are_clean_and_unique():
    specs = ["inception", "microsoft/rad-dino", "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "/data/models/medsiglip/",
             "configs/tiny-clip.json", "ViT-B-32@openai", "other/rad-dino"]
    assert extractor_keys(specs) == ["inception", "rad-dino", "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "medsiglip", "tiny-clip",
                                     "ViT-B-32@openai", "rad-dino-2"]


def test_dinov2_folder_gives_the_cls_token_with_its_own_processor(images, rad_dino_folder):
    extractor = feature_extractor(str(rad_dino_folder))
    assert isinstance(extractor, TransformersImageFeatures) and extractor.num_features == 32
    batch = images["a"][1][:3]
    features = extract_features(batch, extractor)
    model = Dinov2Model.from_pretrained(rad_dino_folder).eval()
    pixels = BitImageProcessor.from_pretrained(rad_dino_folder)(images=[image.numpy().transpose(1, 2, 0) for image in batch], return_tensors="pt")
    with torch.no_grad():
        output = model(**pixels)
    assert torch.allclose(output.pooler_output, output.last_hidden_state[:, 0])  # Dinov2's pooled output is the layer-normed CLS token
    assert torch.allclose(features, output.pooler_output, atol=1e-5)
    gray = extract_features(batch[:, :1], extractor)  # a 1-channel radiograph is repeated to 3 channels
    assert torch.allclose(gray, features, atol=1e-5)


def test_siglip_folder_gives_image_embeddings_and_aligns_text(images, siglip_folder):
    extractor = feature_extractor(str(siglip_folder))
    _, batch, prompts = images["a"]
    features = extract_features(batch[:4], extractor)
    model = SiglipModel.from_pretrained(siglip_folder).eval()
    pixels = SiglipImageProcessor.from_pretrained(siglip_folder)(images=list(batch[:4]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels)
    assert torch.allclose(features, getattr(expected, "pooler_output", expected), atol=1e-5)
    scores = image_text_alignment(batch[:4], prompts[:4], extractor)
    assert 0 <= scores["clip_score"] <= 100 and -1 <= scores["mean_cosine"] <= 1


def test_open_clip_folder_in_hub_layout(images, open_clip_folder):
    extractor = feature_extractor(str(open_clip_folder))
    assert isinstance(extractor, OpenClipImageFeatures) and extractor.num_features == 16
    assert extractor.mean.flatten().tolist() == [0.5] * 3  # the folder's preprocess_cfg is used
    weights = safetensors.torch.load_file(open_clip_folder / "open_clip_model.safetensors")
    assert all(torch.equal(weights[name], value) for name, value in extractor.model.state_dict().items())
    assert extract_features(images["a"][1][:2], extractor).shape == (2, 16)


def test_a_folder_without_a_model_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        feature_extractor(str(tmp_path))


def test_image_only_backbone_refuses_alignment(images, rad_dino_folder):
    with pytest.raises(ValueError, match="no text tower"):
        image_text_alignment(images["a"][1][:2], images["a"][2][:2], feature_extractor(str(rad_dino_folder)))


def test_prdc_equals_the_prdc_package(images, rad_dino_folder):
    extractor = feature_extractor(str(rad_dino_folder))
    real, fake = (extract_features(images[name][1], extractor) for name in ("a", "b"))
    ours = precision_recall_density_coverage(real, fake, nearest_k=5)
    theirs = prdc.compute_prdc(real.double().numpy(), fake.double().numpy(), 5)
    assert ours["nearest_k"] == 5 and all(ours[name] == pytest.approx(float(theirs[name])) for name in ("precision", "recall", "density", "coverage"))
    same = precision_recall_density_coverage(real, real.clone(), nearest_k=3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert precision_recall_density_coverage(real[:4], fake, nearest_k=5)["nearest_k"] == 2  # capped at the smaller set's size - 2


def test_reid_hook_scores_copies_as_the_same_patient(images, reid_folder):
    reid = ReidentificationModel(reid_folder)
    assert reid.config["image_size"] == 48 and reid.threshold == 0.5
    training = images["a"][1]
    copies = memorization_audit(training[[2, 5]], training, features=(torch.eye(16)[[2, 5]], torch.eye(16)), reid=reid)
    assert copies["reid"]["share_above_threshold"] == 1.0 and copies["reid"]["scores"] == pytest.approx([torch.sigmoid(torch.tensor(8.0)).item()] * 2)
    assert copies["pixel"]["nearest_index"] == [2, 5] and copies["pixel"]["mean_nearest_distance"] == 0.0
    assert copies["mean_nearest_feature_distance"] == 0.0 and copies["worst"][0]["reid_score"] > 0.99
    inverted = 255 - training[:4]
    scores = reid.score(inverted, training[:4])
    x, y = (v2.functional.resize(images_.float() / 255, [48, 48], antialias=True)[:, :1] for images_ in (inverted, training[:4]))
    expected = torch.sigmoid(8 - 80 * (((x - 0.5) / 0.5) - ((y - 0.5) / 0.5)).abs().mean(dim=(1, 2, 3)))
    assert torch.allclose(scores, expected, atol=1e-5) and (scores < 0.5).all()


def test_reid_folder_with_an_exported_program(tmp_path, images):
    example = torch.rand(2, 1, 48, 48)
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(PixelSiamese(), (example, example), dynamic_shapes=({0: batch}, {0: batch})), tmp_path / "reid_model.pt2")
    (tmp_path / "reid_config.json").write_text(json.dumps({"image_size": 48, "channels": 1}))
    training = images["a"][1][:5]
    scores = ReidentificationModel(tmp_path).score(training, training)
    assert scores.shape == (5,) and torch.allclose(scores, torch.sigmoid(torch.tensor(8.0)))


def test_reid_folder_errors_name_the_fix(tmp_path, reid_folder):
    with pytest.raises(FileNotFoundError, match="torch.jit.trace"):
        ReidentificationModel(tmp_path)
    (tmp_path / "reid_model.pt").write_bytes((reid_folder / "reid_model.pt").read_bytes())
    (tmp_path / "reid_config.json").write_text(json.dumps({"imagesize": 224}))
    with pytest.raises(ValueError, match="reid_config.json: unknown keys"):
        ReidentificationModel(tmp_path)


def _degrade(images: torch.Tensor, kind: str) -> torch.Tensor:
    x = images.float()
    if kind == "blur":
        x = v2.functional.gaussian_blur(x, kernel_size=[9, 9], sigma=[3.0, 3.0])
    else:
        x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).mul(40).expand_as(x)[:, :1].expand_as(x)
    return x.clamp(0, 255).round().to(torch.uint8)


@pytest.mark.slow
def test_degraded_images_score_worse_on_inception(tmp_path):
    """Real pretrained Inception: real vs real scores better than real vs blurred or noisy (FID lower; precision and recall higher)."""
    real = load_image_folder(write_phantom_dataset(tmp_path / "real", 20, seed=21, size=SIZE), SIZE)[0]
    clean = load_image_folder(write_phantom_dataset(tmp_path / "clean", 20, seed=22, size=SIZE), SIZE)[0]
    inception = InceptionFeatures()
    real_f, clean_f = extract_features(real, inception), extract_features(clean, inception)
    good = {**fid_kid(real_f, clean_f, subsets=10, subset_size=10), **precision_recall_density_coverage(real_f, clean_f)}
    for kind in ("blur", "noise"):
        degraded_f = extract_features(_degrade(clean, kind), inception)
        bad = {**fid_kid(real_f, degraded_f, subsets=10, subset_size=10), **precision_recall_density_coverage(real_f, degraded_f)}
        assert bad["fid"] > 1.5 * good["fid"] and bad["kid_mean"] > good["kid_mean"], kind
        assert bad["precision"] < good["precision"] and bad["recall"] < good["recall"], (kind, good, bad)


@pytest.mark.slow
def test_several_extractors_in_one_command(tmp_path, images, rad_dino_folder, siglip_folder, open_clip_folder, reid_folder, capsys):
    real, generated = images["a"][0], images["b"][0]
    medfm(["eval", "images", "--real", str(real), "--generated", str(generated), "--training_dir", str(real), "--resolution", str(SIZE),
           "--feature_extractor", str(rad_dino_folder), str(siglip_folder), str(open_clip_folder), "--clip_model", str(siglip_folder),
           "--reid_model", str(reid_folder), "--nearest_k", "3", "--device", "cpu", "--output_dir", str(tmp_path / "out")])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    names = [rad_dino_folder.name, siglip_folder.name, open_clip_folder.name]
    assert list(metrics["features"]) == names and metrics["extractor"] == names[0] and metrics["fid"] == metrics["features"][names[0]]["fid"]
    assert [metrics["features"][name]["num_features"] for name in names] == [32, 32, 16]
    for entry in metrics["features"].values():
        assert entry["fid"] > 0 and entry["nearest_k"] == 3 and 0 <= entry["precision"] <= 1 and 0 <= entry["coverage"] <= 1
        assert entry["memorization"]["threshold"] == 0.97
    assert metrics["alignment"]["model"] == siglip_folder.name and "clip_score" in metrics["alignment"]
    audit = metrics["memorization"]
    assert audit["extractor"] == names[0] and len(audit["reid"]["scores"]) == 16 and len(audit["pixel"]["nearest_distance"]) == 16
    page = (tmp_path / "out" / "index.html").read_text()
    assert all(f">{name}</th>" in page for name in names) and "Re-identification" in page and f"alignment ({siglip_folder.name})" in page
    assert "index.html" in capsys.readouterr().out
    assert np.isfinite([entry["fid"] for entry in metrics["features"].values()]).all()
    rows = {row["metric"] for row in _summary("images", metrics)}  # what `--adapter` writes into the model card
    assert {f"{metric} ({name})" for metric in ("fid", "precision", "coverage") for name in names} <= rows
    assert f"clip_score ({siglip_folder.name})" in rows and "reid_share_above_threshold" in rows


def test_open_clip_hf_hub_spec_loads_from_a_hub(open_clip_folder, monkeypatch, tmp_path):
    """`hf-hub:org/repo` (BiomedCLIP's spec form) through the real huggingface_hub client, against the local test Hub."""
    from huggingface_hub import HfApi, constants

    from hub_server import LocalHub

    with LocalHub("hf_medfmTestToken") as server:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        for name, value in (("ENDPOINT", server.endpoint), ("HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"),
                            ("HF_HUB_OFFLINE", False), ("HF_HUB_DISABLE_XET", True), ("HF_HUB_CACHE", str(tmp_path / "cache"))):
            monkeypatch.setattr(constants, name, value)
        api = HfApi(endpoint=server.endpoint, token="hf_medfmTestToken")
        repo = api.create_repo("tiny-biomedclip").repo_id
        api.upload_folder(repo_id=repo, folder_path=open_clip_folder)
        extractor = feature_extractor(f"hf-hub:{repo}")
    weights = safetensors.torch.load_file(open_clip_folder / "open_clip_model.safetensors")
    assert isinstance(extractor, OpenClipImageFeatures) and all(torch.equal(weights[k], v) for k, v in extractor.model.state_dict().items())
    assert extractor_keys([f"hf-hub:{repo}"]) == ["tiny-biomedclip"]
