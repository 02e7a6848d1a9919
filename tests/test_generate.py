"""`medfm generate --prompts FILE`: a labelled synthetic imagefolder, resumable."""

import json

import pytest

from medfm.cli import main as medfm

pytestmark = pytest.mark.slow


def test_prompts_file_gives_a_labelled_imagefolder_and_reruns_skip_existing_images(tmp_path):
    rows = [{"text": "Large right pleural effusion.", "Pleural Effusion": 1}, {"prompt": "Cardiomegaly.", "Cardiomegaly": 1}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    command = ["generate", "--pretrained_model_name_or_path", "builtin:tiny-sd", "--prompts", str(tmp_path / "prompts.jsonl"),
               "--num_images", "2", "--num_inference_steps", "2", "--output_dir", str(tmp_path / "out")]
    medfm(command)
    metadata = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert [m["file_name"] for m in metadata] == ["0000-00.png", "0000-01.png", "0001-00.png", "0001-01.png"]
    assert metadata[0]["Pleural Effusion"] == 1 and metadata[2]["text"] == "Cardiomegaly." and metadata[2]["Cardiomegaly"] == 1
    assert all(m["synthetic"] == "true" and m["base_model"] for m in metadata)

    first = tmp_path / "out" / "0000-00.png"
    stamp = first.stat().st_mtime_ns
    (tmp_path / "out" / "0001-01.png").unlink()
    medfm(command)
    assert first.stat().st_mtime_ns == stamp  # done prompts are skipped
    assert (tmp_path / "out" / "0001-01.png").is_file()
    assert len((tmp_path / "out" / "metadata.jsonl").read_text().splitlines()) == 4


def test_prompts_file_without_text_is_a_clear_error(tmp_path):
    (tmp_path / "prompts.csv").write_text("Cardiomegaly\n1\n")
    with pytest.raises(ValueError, match="row 1 has no `text` or `prompt`"):
        medfm(["generate", "--pretrained_model_name_or_path", "builtin:tiny-sd", "--prompts", str(tmp_path / "prompts.csv")])


def test_batched_prompts_start_from_the_noise_plain_diffusers_draws(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from medfm.generate import generate_images, load_text_to_image_pipeline

    pipe = load_text_to_image_pipeline(None, "builtin:tiny-sd", device="cpu")[0]
    pipe.set_progress_bar_config(disable=True)
    prompts = ["Large right pleural effusion.", "Cardiomegaly.", "No acute cardiopulmonary process."]
    paths = generate_images(prompts, tmp_path, pretrained_model_name_or_path="builtin:tiny-sd", num_images=2, num_inference_steps=3, seed=5,
                            batch_size=2, pipe=pipe)
    for p, prompt in enumerate(prompts):
        expected = pipe(prompt, num_images_per_prompt=2, num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="np").images
        for i in range(2):
            written = np.asarray(Image.open(paths[2 * p + i]), dtype=np.float32) / 255
            assert np.abs(written - expected[i]).max() <= 2 / 255, (prompt, i)  # batching changes float rounding only
