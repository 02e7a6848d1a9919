"""Cached encodings of frozen encoders: keyed by content, preprocessing and encoder; same training result as without them."""

import pytest
import torch
from safetensors.torch import load_file

from medfm.config import ConfigError, parse_train_config
from medfm.data.cache import EncodingCache, encoder_identity
from medfm.data.phantom import write_phantom_dataset
from medfm.lora import LORA_WEIGHTS_NAME
from recipes.train_lora import main as train


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return str(write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), num_images=8, seed=5, size=64))


def fast(data_dir, output_dir, cache_dir, *extra):
    return ["--train_data_dir", str(data_dir), "--output_dir", str(output_dir), "--cache_dir", str(cache_dir), "--resolution", "64",
            "--train_batch_size", "4", "--learning_rate", "1e-3", "--validation_prompt", "Cardiomegaly.", "--num_validation_images", "1",
            "--validation_inference_steps", "1", "--report_to", "none", *map(str, extra)]


def entries(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}


@pytest.mark.slow
def test_cache_is_reused_across_runs_and_recomputed_when_the_resolution_changes(phantoms, tmp_path):
    cache = tmp_path / "cache"
    train(fast(phantoms, tmp_path / "a", cache, "--max_train_steps", 1))
    latents, texts = entries(cache / "vae-latents"), entries(cache / "text-embeddings")
    assert len(latents) == 8 and 1 <= len(texts) <= 8  # one per image; one per distinct report
    entry = load_file(next((cache / "vae-latents").rglob("*.safetensors")))
    assert entry["latent_mean"].shape[1:] == (8, 8) and entry["latent_std"].shape == entry["latent_mean"].shape

    train(fast(phantoms, tmp_path / "b", cache, "--max_train_steps", 1))
    assert entries(cache / "vae-latents") == latents and entries(cache / "text-embeddings") == texts  # nothing re-encoded

    train(fast(phantoms, tmp_path / "c", cache, "--max_train_steps", 1, "--resolution", 32))
    after = entries(cache / "vae-latents")
    assert len(after) == 16 and all(after[name] == stamp for name, stamp in latents.items())  # 8 new entries at 32 px
    assert entries(cache / "text-embeddings") == texts


@pytest.mark.slow
def test_cached_and_uncached_runs_train_the_same_adapter(phantoms, tmp_path):
    train(fast(phantoms, tmp_path / "cached", tmp_path / "cache", "--max_train_steps", 4))
    train(fast(phantoms, tmp_path / "plain", tmp_path / "unused", "--max_train_steps", 4, "--no-cache_latents", "--no-cache_text_embeddings"))
    assert not (tmp_path / "unused").exists()
    cached, plain = load_file(tmp_path / "cached" / LORA_WEIGHTS_NAME), load_file(tmp_path / "plain" / LORA_WEIGHTS_NAME)
    for key in plain:  # float rounding of batched vs per-item encoding, amplified by Adam on near-zero gradients: ~1e-5
        torch.testing.assert_close(cached[key], plain[key], rtol=0, atol=1e-4, msg=key)


@pytest.mark.slow
def test_text_embeddings_are_not_cached_when_the_text_encoder_trains(phantoms, tmp_path):
    train(fast(phantoms, tmp_path / "run", tmp_path / "cache", "--max_train_steps", 1, "--train_text_encoder"))
    assert entries(tmp_path / "cache" / "vae-latents") and not (tmp_path / "cache" / "text-embeddings").exists()
    with pytest.raises(ConfigError, match="cache_text_embeddings cannot be used with train_text_encoder"):
        parse_train_config(["--train_text_encoder", "--cache_text_embeddings"], exit_on_error=False)


def test_encoder_identity_follows_weights_and_dtype_not_the_folder():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    model.config = {"in": 4, "_name_or_path": "/somewhere"}
    same = torch.nn.Linear(4, 4)
    same.load_state_dict(model.state_dict())
    same.config = {"in": 4, "_name_or_path": "/elsewhere"}
    assert encoder_identity(model) == encoder_identity(same)
    with torch.no_grad():
        same.weight[0, 0] += 1e-3
    assert encoder_identity(model) != encoder_identity(same)
    assert encoder_identity(model) != encoder_identity(model.to(torch.bfloat16))


def test_cache_key_depends_on_content_settings_and_encoder(tmp_path):
    cache = EncodingCache(tmp_path, "latents", "encoder-a", {"resolution": 64})
    key = cache.key(b"image bytes")
    assert key == EncodingCache(tmp_path, "latents", "encoder-a", {"resolution": 64}).key(b"image bytes")
    assert key != cache.key(b"other bytes")
    assert key != EncodingCache(tmp_path, "latents", "encoder-a", {"resolution": 32}).key(b"image bytes")
    assert key != EncodingCache(tmp_path, "latents", "encoder-b", {"resolution": 64}).key(b"image bytes")
    cache.save(key, {"x": torch.arange(3.0)})
    assert cache.has(key) and torch.equal(cache.load(key)["x"], torch.arange(3.0))
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically, no staging file left
