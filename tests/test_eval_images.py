import json

import open_clip
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from medfm.data.phantom import write_phantom_dataset
from medfm.eval.features import InceptionFeatures, OpenClipImageFeatures, extract_features, feature_extractor
from medfm.eval.images import (
    evaluate_image_folders,
    fid_kid,
    image_text_alignment,
    memorization_audit,
    ms_ssim_diversity,
)

SIZE = 64
TINY_CLIP = {  # a randomly initialised open_clip ViT small enough for CPU tests
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def phantoms(phantom_folders):
    """Two phantom imagefolders of different seeds (conftest.py): (folder, uint8 images, prompts) each."""
    return phantom_folders(24)


@pytest.fixture(scope="module")
def tiny_clip_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-test-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_config):
    torch.manual_seed(0)
    return OpenClipImageFeatures(tiny_clip_config)


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures()


def test_load_image_folder(phantoms):
    _, images, prompts = phantoms["a"]
    assert images.shape == (24, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], images[:, 2])
    assert len(prompts) == 24 and prompts[0].startswith("FINDINGS:")


def test_fid_equals_torchmetrics_with_same_extractor(phantoms, tiny_clip):
    real, fake = phantoms["a"][1], phantoms["b"][1]
    direct = FrechetInceptionDistance(feature=tiny_clip)
    direct.update(real, real=True)
    direct.update(fake, real=False)
    ours = fid_kid(real, fake, tiny_clip, subsets=5, subset_size=8)
    assert ours["fid"] == pytest.approx(float(direct.compute()), rel=1e-4, abs=1e-6)


def test_kid_returns_mean_and_std(phantoms, tiny_clip):
    scores = fid_kid(phantoms["a"][1], 255 - phantoms["b"][1], tiny_clip, subsets=5, subset_size=8)
    assert set(scores) == {"fid", "kid_mean", "kid_std"}
    assert scores["kid_mean"] > 0 and scores["kid_std"] >= 0


def test_inception_features_shape(inception):
    assert extract_features(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8), inception).shape == (2, 2048)
    assert isinstance(feature_extractor(), InceptionFeatures)


@pytest.mark.slow
def test_inception_fid_separates_distributions(phantoms, inception):
    a, b = (extract_features(phantoms[name][1], inception) for name in ("a", "b"))
    inverted = extract_features(255 - phantoms["b"][1], inception)
    same = fid_kid(a, b, subsets=5, subset_size=12)
    different = fid_kid(a, inverted, subsets=5, subset_size=12)
    assert same["fid"] * 3 < different["fid"]
    assert same["kid_mean"] < different["kid_mean"]


def test_ms_ssim_diversity(phantoms):
    images = phantoms["a"][1]
    scores = ms_ssim_diversity({"same": images[:1].repeat(4, 1, 1, 1), "different": images[:4], "single": images[:1]})
    assert scores["per_prompt"]["same"] == pytest.approx(1.0, abs=1e-4)
    assert scores["per_prompt"]["different"] < 0.95
    assert "single" not in scores["per_prompt"]
    assert scores["mean"] == pytest.approx((scores["per_prompt"]["same"] + scores["per_prompt"]["different"]) / 2)


@pytest.mark.slow
def test_memorization_audit_flags_copies(phantoms, inception):
    training = phantoms["a"][1][:16]
    copies = memorization_audit(training[[3, 7, 11]], training, inception, threshold=0.97, k=2)
    assert copies["near_copy_rate"] == 1.0
    assert copies["nearest_index"] == [3, 7, 11]
    assert copies["nearest_ssim"] == pytest.approx([1.0] * 3, abs=1e-4)
    assert len(copies["worst"]) == 2
    distinct = memorization_audit(phantoms["b"][1][:8], training, inception, threshold=0.97)
    assert distinct["near_copy_rate"] <= 0.125
    assert distinct["mean_nearest_cosine"] < copies["mean_nearest_cosine"]


def test_clip_score_with_untrained_open_clip(phantoms):
    _, images, prompts = phantoms["a"]
    model, _, _ = open_clip.create_model_and_transforms("RN50", pretrained=None)
    scores = image_text_alignment(images[:2], prompts[:2], OpenClipImageFeatures(model, open_clip.get_tokenizer("RN50")))
    assert 0 <= scores["clip_score"] <= 100 and -1 <= scores["mean_cosine"] <= 1
    assert scores["clip_score"] >= 100 * scores["mean_cosine"] - 1e-4  # CLIPScore clips each cosine at 0 (float32 rounding aside)


def test_evaluate_image_folders_writes_report(phantoms, tiny_clip_config, tmp_path):
    generated = write_phantom_dataset(tmp_path / "generated", 8, seed=3, size=SIZE)
    rows = [json.loads(line) for line in (generated / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["text"] = f"prompt {i // 4}"  # 4 samples per prompt, as RoentGen's diversity protocol
    (generated / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics = evaluate_image_folders(
        phantoms["a"][0], generated, tmp_path / "report", size=SIZE, extractors=tiny_clip_config,
        training_dir=phantoms["b"][0], clip_model=tiny_clip_config,
    )
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved.keys() == metrics.keys() and saved["fid"] == pytest.approx(metrics["fid"])
    assert {"fid", "kid_mean", "kid_std", "features", "ms_ssim_diversity", "alignment", "memorization"} <= set(saved)
    assert saved["extractor"] == saved["alignment"]["model"] == "tiny-test-clip" and saved["features"]["tiny-test-clip"]["fid"] == saved["fid"]
    assert set(saved["ms_ssim_diversity"]["per_prompt"]) == {"prompt 0", "prompt 1"}
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("<img") >= 3 and "prompt 1" in page


@pytest.mark.slow
def test_eval_images_command_writes_metrics_and_html(tmp_path, capsys):
    from medfm.cli import main as medfm

    write_phantom_dataset(tmp_path / "real", 8, seed=11, size=64)
    write_phantom_dataset(tmp_path / "generated", 8, seed=12, size=64)
    medfm(["eval", "images", "--real", str(tmp_path / "real"), "--generated", str(tmp_path / "generated"), "--output_dir",
           str(tmp_path / "out"), "--resolution", "64", "--training_dir", str(tmp_path / "real")])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["fid"] > 0 and "memorization" in json.dumps(metrics)
    assert "<img" in (tmp_path / "out" / "index.html").read_text()
    assert "index.html" in capsys.readouterr().out
