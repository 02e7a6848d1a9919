"""Push and pull adapters with the real huggingface_hub client over HTTP, against a local Hub-compatible server."""

import numpy as np
import pytest
from huggingface_hub import constants
from PIL import Image

from hub_server import LocalHub
from medfm.cli import main as medfm
from medfm.data.phantom import write_phantom_dataset
from medfm.generate import generate_images
from medfm.hub import resolve_adapter
from recipes.train_lora import main as train

pytestmark = pytest.mark.slow
TOKEN = "hf_medfmPlantedTestToken7f3a9c1e5b"
PROMPT = "Large right pleural effusion."


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The local server as HF_ENDPOINT, a planted HF_TOKEN, online mode and a fresh download cache, for this test only."""
    with LocalHub(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        # huggingface_hub reads these once at import time
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the local server speaks LFS, not Xet
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        yield server


def files_containing(folder, text: str) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.is_file() and text.encode() in path.read_bytes()]


def test_train_with_push_to_hub_then_generate_from_the_hub_id_gives_identical_images(hub, tmp_path, capsys):
    data = write_phantom_dataset(tmp_path / "phantoms", num_images=8, seed=1, size=64)
    out = tmp_path / "run"
    train(["--train_data_dir", str(data), "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "4", "--max_train_steps", "4",
           "--learning_rate", "1e-3", "--checkpointing_steps", "2", "--validation_prompt", PROMPT, "--num_validation_images", "1",
           "--validation_inference_steps", "2", "--report_to", "tensorboard", "--dataset_description", "Phantoms made for this test.",
           "--push_to_hub", "--hub_model_id", "cxr-lora"])
    printed = capsys.readouterr()
    repo = hub.repos["medfm-user/cxr-lora"]  # a bare name lands in the token owner's namespace, as on the Hub
    assert f"Pushed to {hub.endpoint}/medfm-user/cxr-lora" in printed.out
    assert {"pytorch_lora_weights.safetensors", "README.md", "training_config.yaml", "bad_rows.jsonl"} <= set(repo.files)
    assert "pytorch_lora_weights.safetensors" in repo.lfs and not any(p.startswith("checkpoint-") for p in repo.files)
    assert (out / "checkpoint-2").is_dir() and any(p.startswith("logs/") for p in repo.files)
    assert repo.files["pytorch_lora_weights.safetensors"] == (out / "pytorch_lora_weights.safetensors").read_bytes()
    card = repo.files["README.md"].decode()
    assert 'load_lora_weights("medfm-user/cxr-lora")' in card and "Phantoms made for this test." in card

    # The token was really used, and is nowhere in what the run wrote or printed.
    sent = [a for a in hub.authorizations if a is not None]
    assert sent and set(sent) == {f"Bearer {TOKEN}"}
    assert files_containing(out, TOKEN) == [] and TOKEN not in printed.out + printed.err
    assert all(TOKEN.encode() not in content for content in repo.files.values())

    from_hub = generate_images([PROMPT], tmp_path / "from-hub", adapter="medfm-user/cxr-lora", num_inference_steps=3)
    local = generate_images([PROMPT], tmp_path / "local", adapter=str(out), num_inference_steps=3)
    assert resolve_adapter("medfm-user/cxr-lora").is_relative_to(tmp_path / "hf-cache")
    assert np.array_equal(np.asarray(Image.open(from_hub[0])), np.asarray(Image.open(local[0])))


def test_medfm_push_private_repo_needs_the_token_to_read(hub, tmp_path, capsys, monkeypatch):
    data = write_phantom_dataset(tmp_path / "phantoms", num_images=4, seed=2, size=64)
    out = tmp_path / "adapter"
    train(["--train_data_dir", str(data), "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "4", "--max_train_steps", "1",
           "--validation_prompt", PROMPT, "--num_validation_images", "1", "--validation_inference_steps", "1", "--report_to", "none"])
    capsys.readouterr()
    medfm(["push", str(out), "--repo_id", "radiology-lab/private-lora", "--private"])
    assert capsys.readouterr().out.strip() == f"Pushed {out} to {hub.endpoint}/radiology-lab/private-lora"
    assert hub.repos["radiology-lab/private-lora"].private
    assert 'load_lora_weights("radiology-lab/private-lora")' in (out / "README.md").read_text()  # the card now names the repo
    assert (resolve_adapter("radiology-lab/private-lora") / "pytorch_lora_weights.safetensors").is_file()

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "other-cache"))
    with pytest.raises(FileNotFoundError, match="radiology-lab/private-lora: no such local folder, and it could not be downloaded"):
        resolve_adapter("radiology-lab/private-lora")
    with pytest.raises(SystemExit, match="medfm push: error: No Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        medfm(["push", str(out), "--repo_id", "radiology-lab/another"])
    assert "radiology-lab/another" not in hub.repos


def test_adapter_that_is_neither_a_folder_nor_a_hub_id_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found .*is not a Hub id"):
        resolve_adapter(str(tmp_path / "no" / "such" / "adapter"))
    with pytest.raises(SystemExit, match="medfm generate: error: Adapter folder"):
        medfm(["generate", "--adapter", str(tmp_path / "missing" / "x" / "y"), "--prompt", PROMPT])
