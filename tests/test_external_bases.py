"""Bases built WITHOUT medfm: tiny Sana and SDXL pipelines made straight from diffusers/transformers classes, with tokenizers
trained here by the `tokenizers` library, saved by `save_pretrained` as plain diffusers folders. medfm trains a LoRA on each,
plain diffusers loads it, and `medfm generate` gives the same pixels."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaPipeline,
    SanaTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, Gemma2Config, Gemma2Model, GemmaTokenizerFast

from medfm.cli import main as medfm
from medfm.data.phantom import write_phantom_dataset
from medfm.lora import LORA_WEIGHTS_NAME
from recipes.train_lora import main as train

pytestmark = pytest.mark.slow
PROMPT = "Large right pleural effusion."
CORPUS = [PROMPT, "No acute cardiopulmonary process.", "The heart is normal in size. The lungs are clear.", "Small left pneumothorax.",
          "FINDINGS: Mild cardiomegaly without edema. IMPRESSION: Stable chest radiograph.", "Right lower lobe opacity, likely atelectasis."]
SEQUENCE = 16


def gemma_style_tokenizer() -> GemmaTokenizerFast:
    """A byte-fallback BPE in Gemma's layout (<pad>=0, <eos>=1, <bos>=2, <unk>=3, "▁" for spaces, <bos> prepended), trained here
    on a few report sentences and on the instruction SanaPipeline prepends to every prompt."""
    import inspect

    instruction = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", *(f"<0x{b:02X}>" for b in range(256))]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    text = [line.replace(" ", "▁") for line in [*CORPUS, *instruction]]
    tokenizer.train_from_iterator(text * 4, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return GemmaTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                              model_max_length=8192)


def clip_style_tokenizer(pad_token: str) -> CLIPTokenizer:
    """A lower-case byte-level BPE with CLIP's "</w>" word ends, trained here; `pad_token` as SDXL's two tokenizers differ ("!" for the second)."""
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=1000, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False))
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77, pad_token=pad_token)


def external_sana(folder):
    """Tiny Sana from its classes, as diffusers' own pipeline tests make one; the text encoder saved in bfloat16 as released Sana folders ship Gemma 2."""
    torch.manual_seed(0)
    tokenizer = gemma_style_tokenizer()
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=1, head_dim=8, max_position_embeddings=8192, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                                         num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16, sample_size=16)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8, 8),
                        decoder_block_out_channels=(8, 8, 8), encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder.to(torch.bfloat16), transformer=transformer, vae=vae,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(folder)
    return {"max_sequence_length": SEQUENCE, "use_resolution_binning": False}


def external_sdxl(folder, dtype=torch.float32):
    """Tiny SDXL from its classes, as diffusers' own pipeline tests make one: two CLIP encoders (the second with projection), text_time UNet, factor-4 VAE."""
    torch.manual_seed(0)
    clip = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, hidden_act="gelu", projection_dim=32)
    tokenizer, tokenizer_2 = clip_style_tokenizer("<|endoftext|>"), clip_style_tokenizer("!")
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(pad_token_id=tokenizer.pad_token_id, **ids, **clip))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(pad_token_id=tokenizer_2.pad_token_id, **ids, **clip))
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
                                norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=4, sample_size=64)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                     unet=unet, scheduler=scheduler)
    pipe.to(dtype).save_pretrained(folder)
    return {}


def train_args(base, out, data, tmp_path, steps=3):
    return ["--pretrained_model_name_or_path", str(base), "--output_dir", str(out), "--train_data_dir", str(data), "--resolution", "64",
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "1e-2", "--max_sequence_length", str(SEQUENCE),
            "--cache_dir", str(tmp_path / "cache"), "--validation_prompt", PROMPT, "--num_validation_images", "1",
            "--validation_inference_steps", "2", "--report_to", "none"]


@pytest.mark.parametrize("build", [external_sana, external_sdxl], ids=["sana", "sdxl"])
def test_medfm_trains_on_a_folder_built_without_medfm_and_plain_diffusers_gives_generate_pixels(build, tmp_path):
    base, out = tmp_path / "base", tmp_path / "run"
    plain_call = build(base)
    data = write_phantom_dataset(tmp_path / "phantoms", num_images=4, seed=3, size=64)
    train(train_args(base, out, data, tmp_path))

    def plain(adapter=None):
        pipe = DiffusionPipeline.from_pretrained(base)
        pipe.set_progress_bar_config(disable=True)
        if adapter:
            pipe.load_lora_weights(adapter)
        image = pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5, height=64, width=64, generator=torch.Generator().manual_seed(0), **plain_call).images[0]
        return np.asarray(image, dtype=np.int16)

    before, after = plain(), plain(str(out))
    assert np.abs(after - before).mean() > 0.1  # the adapter is loaded and changes the image at a fixed seed
    medfm(["generate", "--adapter", str(out), "--prompt", PROMPT, "--num_inference_steps", "2", "--seed", "0", "--resolution", "64",
           "--output_dir", str(tmp_path / "gen")])
    generated = np.asarray(Image.open(tmp_path / "gen" / "0000-00.png"), dtype=np.int16)
    assert np.abs(generated - after).max() <= 1


def test_a_base_stored_in_float16_only_trains_in_float32(tmp_path):
    """Many community SDXL checkpoints ship float16 weights only; without mixed precision medfm trains the whole base in float32
    (it used to leave the stored float16 in place, and the UNet met float32 inputs)."""
    base, out = tmp_path / "base", tmp_path / "run"
    external_sdxl(base, torch.float16)
    train(train_args(base, out, write_phantom_dataset(tmp_path / "phantoms", num_images=2, seed=3, size=64), tmp_path, steps=1))
    weights = load_file(out / LORA_WEIGHTS_NAME)
    assert weights and all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    assert (out / "validation" / "step-000001.png").is_file()
