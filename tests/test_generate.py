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
