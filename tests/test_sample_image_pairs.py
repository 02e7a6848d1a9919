"""`medfm pairs --task text-to-image`: images sampled with the shipped tiny adapter, judged by a scorer given by dotted path,
best vs worst kept above the margin, written in the format Diffusion-DPO training reads."""

import json

import numpy as np
import pytest
from PIL import Image

from medfm.cli import main as medfm
from medfm.data.image_preferences import ImagePreferenceDataset
from medfm.models.families import DIFFUSION_FAMILIES
from medfm.sample_image_pairs import load_scorer, make_image_preference_pairs

ADAPTER = "adapters/phantom-text-to-image"
PROMPTS = ["Large right pleural effusion.", "Small left pleural effusion. Enlarged heart."]
FAST = {"num_samples": 3, "num_inference_steps": 2, "guidance_scale": 4.0, "resolution": 64}


def brightness(images, prompts):
    """A tiny scorer: mean pixel value (higher wins)."""
    assert len(images) == len(prompts)
    return [float(np.asarray(image, dtype=np.float32).mean()) for image in images]


def test_pairs_are_best_vs_worst_and_train_ready(tmp_path):
    output = tmp_path / "prefs.jsonl"
    counts = make_image_preference_pairs(ADAPTER, PROMPTS, output, brightness, margin=0.0, **FAST)
    assert counts["pairs"] == 2 and counts["images"] == 6 and counts["below_margin"] == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    for prompt, row in zip(PROMPTS, rows):
        assert row["prompt"] == prompt and row["chosen"] != row["rejected"]
        chosen, rejected = (np.asarray(Image.open(tmp_path / row[side]).convert("RGB"), dtype=np.float32).mean() for side in ("chosen", "rejected"))
        assert chosen == pytest.approx(row["chosen_score"]) and rejected == pytest.approx(row["rejected_score"]) and chosen > rejected
        siblings = sorted((tmp_path / row["chosen"]).parent.glob("*.png"))
        assert len(siblings) == 3 and max(brightness([Image.open(p).convert("RGB") for p in siblings], [prompt] * 3)) == pytest.approx(chosen)
    tokenizer = DIFFUSION_FAMILIES["sd"].build_tiny().tokenizer
    dataset = ImagePreferenceDataset(output, 64, tokenizer, 70)
    assert len(dataset) == 2 and dataset[0]["pixel_values"].shape == dataset[0]["rejected_pixel_values"].shape == (3, 64, 64)
    # prompts draw different noise: the two prompts' first images differ
    first = [np.asarray(Image.open(tmp_path / "prefs" / f"{p:05d}" / "0000-00.png")) for p in range(2)]
    assert not np.array_equal(*first)

    counts = make_image_preference_pairs(ADAPTER, PROMPTS, output, brightness, margin=1e6, **FAST)  # images reused; nothing passes
    assert counts["pairs"] == 0 and counts["below_margin"] == 2 and output.read_text() == ""


def test_cli_loads_the_scorer_by_dotted_path(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    output = tmp_path / "prefs.jsonl"
    medfm(["pairs", "--task", "text-to-image", "--adapter", ADAPTER, "--prompts", str(prompts), "--scorer", f"{__name__}:brightness",
           "--output", str(output), "--num_samples", "2", "--num_inference_steps", "2", "--resolution", "64", "--margin", "0"])
    assert '"pairs": 2' in capsys.readouterr().out and len(output.read_text().splitlines()) == 2
    with pytest.raises(SystemExit, match="--scorer"):
        medfm(["pairs", "--task", "text-to-image", "--adapter", ADAPTER, "--prompts", str(prompts), "--output", str(output)])


def test_bad_scorers_are_named():
    with pytest.raises(ValueError, match="--scorer no_such_module:f"):
        load_scorer("no_such_module:f")
    with pytest.raises(ValueError, match="not callable"):
        load_scorer("medfm.sample_image_pairs:__doc__")
    with pytest.raises(ValueError, match="at least 2"):
        make_image_preference_pairs(ADAPTER, PROMPTS, "x.jsonl", brightness, num_samples=1)
