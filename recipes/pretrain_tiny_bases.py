"""Pretrain medfm's tiny built-in bases on digital phantoms, with one finding left out, on a CPU.

    python recipes/pretrain_tiny_bases.py text-to-image   # VAE, then text encoder + UNet; writes medfm/bases/tiny-sd.safetensors
    python recipes/pretrain_tiny_bases.py report          # tiny LLaVA: vision tower, then all weights (tower at lr/10);
                                                          # writes medfm/bases/tiny-llava.safetensors

Pleural effusion is never drawn and never reported positively during pretraining (reports still say
"No pleural effusion."), so a LoRA run on the built-in phantoms has something real to teach. The files
record the base and phantom versions; medfm refuses to load them into a different architecture or
phantom generator. Each run takes well under an hour on 2 CPU cores and is deterministic given its seed.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from PIL import Image
from tqdm.auto import tqdm

from medfm.config import BUILTIN_TINY_VLM
from medfm.data.phantom import make_phantom
from medfm.data.report_batches import ReportCollator, encode_prompts, end_token_id, report_token_loss
from medfm.data.studies import to_pil_rgb
from medfm.models.diffusion import SHIPPED_TINY_SD, TINY_SD_VERSION, build_tiny_sd_pipeline, pretrained_modules
from medfm.models.shipped import LEFT_OUT_OF_PRETRAINING, save_shipped_weights
from medfm.models.vlm import BUILTIN_TINY_VLMS, SHIPPED_TINY_VLM, TINY_VLM_VERSION, build_tiny_vlm, family_of

PRETRAIN_PHANTOM_SEED = 100  # phantom seeds PRETRAIN_PHANTOM_SEED * 1_000_003 + i: disjoint from the built-in training/validation sets
SAMPLE_PROMPTS = ("No acute cardiopulmonary process.", "Cardiomegaly.", "Large right pneumothorax.",
                  "Right lower lobe consolidation.", "Large left pleural effusion.")
REPORT_INSTRUCTION = "Write the impression of the radiology report for this chest X-ray."  # as recipes/configs/demo-report.yaml


def draw_phantoms(num_images: int, size: int) -> tuple[np.ndarray, list[dict]]:
    """Phantoms without the left-out finding: uint8 images (N, size, size) and their records."""
    images, records = [], []
    for i in tqdm(range(num_images), desc="Drawing phantoms", unit="img"):
        image, record = make_phantom(PRETRAIN_PHANTOM_SEED * 1_000_003 + i, size, left_out=(LEFT_OUT_OF_PRETRAINING,))
        images.append(np.round(image * 255).astype(np.uint8))
        records.append(record)
    return np.stack(images), records


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 3, H, W) in [-1, 1], the way training data is fed."""
    return (images.float() / 127.5 - 1).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def train_vae(vae, images: np.ndarray, steps: int, batch_size: int, crop: int, generator: torch.Generator) -> None:
    """Reconstruction (L1) + a light KL term, on random crops: the VAE is fully convolutional, crops cost a quarter."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=100, num_training_steps=steps)
    pixels = torch.from_numpy(images)
    size = pixels.shape[-1]
    progress = tqdm(range(steps), desc="VAE", unit="step")
    for _ in progress:
        index = torch.randint(len(pixels), (batch_size,), generator=generator)
        top, left = torch.randint(size - crop + 1, (2,), generator=generator).tolist()
        x = to_model_range(pixels[index, top:top + crop, left:left + crop])
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(reconstruction, x) + 1e-4 * posterior.kl().mean() / posterior.mean[0].numel()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image at full size."""
    means, stds = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="Encoding latents", unit="batch"):
        posterior = vae.encode(to_model_range(torch.from_numpy(images[start:start + batch_size]))).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def caption_variants(record: dict) -> tuple[str, str, str]:
    """The texts a user prompts with: the impression (as RoentGen), the findings, or both."""
    return record["impression"], record["findings"], f"{record['findings']} {record['impression']}"


def train_denoiser(pipe, latent_mean, latent_std, records, steps: int, batch_size: int, generator: torch.Generator) -> None:
    """Text encoder + UNet from scratch with the DDPM objective, min-SNR weighting, caption dropout and EMA."""
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    texts = [caption_variants(record) for record in records]
    token_ids = tokenizer([t for variants in texts for t in variants] + [""], padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    empty_ids, token_ids = token_ids[-1], token_ids[:-1].view(len(records), 3, -1)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-2)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=200, num_training_steps=steps)
    ema = EMAModel(parameters, decay=0.999, use_ema_warmup=True, power=2 / 3)
    scaling = pipe.vae.config.scaling_factor
    unet.train()
    text_encoder.train()
    progress = tqdm(range(steps), desc="Text encoder + UNet", unit="step")
    for _ in progress:
        index = torch.randint(len(records), (batch_size,), generator=generator)
        latents = (latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=generator)) * scaling
        variant = torch.multinomial(torch.tensor([0.5, 0.25, 0.25]), batch_size, replacement=True, generator=generator)
        ids = token_ids[index, variant]
        ids[torch.rand(batch_size, generator=generator) < 0.1] = empty_ids  # unconditional 10% of the time, for guidance
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        prediction = unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, text_encoder(ids)[0]).sample
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=5.0) / snr
        loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(parameters)
        progress.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(parameters)
    unet.eval()
    text_encoder.eval()


def save_sample_grid(pipe, path: Path, seeds=(0, 1, 2, 3)) -> None:
    """One row per SAMPLE_PROMPTS entry, one column per seed, to look at what pretraining learned."""
    rows = []
    pipe.set_progress_bar_config(disable=True)
    for prompt in SAMPLE_PROMPTS:
        images = [pipe(prompt, num_inference_steps=30, guidance_scale=4.0, generator=torch.Generator().manual_seed(s), output_type="np").images[0]
                  for s in seeds]
        rows.append(np.concatenate(images, axis=1))
    Image.fromarray(np.round(np.concatenate(rows, axis=0) * 255).astype(np.uint8)).save(path)


def pretrain_text_to_image(args) -> None:
    generator = torch.Generator().manual_seed(args.seed)
    pipe = build_tiny_sd_pipeline(seed=args.seed)
    images, records = draw_phantoms(args.num_images, pipe.vae.config.sample_size)
    train_vae(pipe.vae, images, args.vae_steps, batch_size=16, crop=64, generator=generator)
    latent_mean, latent_std = encode_latents(pipe.vae, images)
    scaling_factor = float(1 / (latent_mean + latent_std * torch.randn(latent_mean.shape, generator=generator)).std())
    pipe.vae.register_to_config(scaling_factor=scaling_factor)
    train_denoiser(pipe, latent_mean, latent_std, records, args.denoiser_steps, batch_size=32, generator=generator)
    path = save_shipped_weights(pretrained_modules(pipe), SHIPPED_TINY_SD, TINY_SD_VERSION, LEFT_OUT_OF_PRETRAINING, "text-to-image",
                                vae_scaling_factor=f"{scaling_factor:.6f}")
    print(f"Wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.samples_dir:
        args.samples_dir.mkdir(parents=True, exist_ok=True)
        save_sample_grid(pipe, args.samples_dir / "tiny-sd-samples.png")
        print(f"Samples (rows: {', '.join(SAMPLE_PROMPTS)}): {args.samples_dir / 'tiny-sd-samples.png'}")


def impression_sentence_targets(records: list[dict], min_count: int) -> torch.Tensor:
    """Multi-hot (N, K) over the impression sentences seen at least `min_count` times: finding, side and size together."""
    sentences = [[s.strip() + "." for s in record["impression"].split(".") if s.strip()] for record in records]
    counts = Counter(s for per_record in sentences for s in per_record)
    vocabulary = sorted(s for s, count in counts.items() if count >= min_count)
    return torch.tensor([[float(s in per_record) for s in vocabulary] for per_record in sentences])


def image_patches(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, patches, patch_size**2): each patch's grey values, in the raster order of the image tokens."""
    return F.unfold(pixel_values[:, :1], kernel_size=patch_size, stride=patch_size).transpose(1, 2)


def train_vision_tower(model, processor, studies: list[dict], steps: int, batch_size: int, generator: torch.Generator) -> None:
    """Stage 1, as LLaVA-Rad starts from an image encoder pretrained on chest X-rays: vision tower + projector learn to
    tell which impression sentences an image has (a linear probe on the mean projected image feature) and to keep what
    each patch looks like (a linear head rebuilding the patch from its image token), so that densities no report named,
    such as the left-out finding's, stay in the features for a LoRA run to use. Both heads are discarded after."""
    targets = impression_sentence_targets([{"impression": study["report"]} for study in studies], min_count=20)
    pixels = processor.image_processor([study["images"][0] for study in studies], return_tensors="pt")["pixel_values"]
    patch_size = processor.patch_size  # the image one token covers
    hidden_size = model.config.text_config.hidden_size
    probe, patch_head = torch.nn.Linear(hidden_size, targets.shape[1]), torch.nn.Linear(hidden_size, patch_size**2)
    parameters = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(), *probe.parameters(),
                  *patch_head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-2)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=100, num_training_steps=steps)
    model.train()
    progress = tqdm(range(steps), desc="Vision tower", unit="step")
    for _ in progress:
        index = torch.randint(len(studies), (batch_size,), generator=generator)
        tokens = torch.stack(list(model.get_image_features(pixel_values=pixels[index]).pooler_output))
        sentence_loss = F.binary_cross_entropy_with_logits(probe(tokens.mean(dim=1)), targets[index])
        patch_loss = F.mse_loss(patch_head(tokens), image_patches(pixels[index], patch_size))
        (sentence_loss + patch_loss).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(sentences=f"{sentence_loss.item():.4f}", patches=f"{patch_loss.item():.4f}")
    model.eval()


def train_vlm(model, collator: ReportCollator, studies: list[dict], steps: int, batch_size: int, generator: torch.Generator) -> None:
    """Stage 2: every weight with the report-only language-modelling loss, the vision tower at a tenth of the learning rate:
    at the full rate it lost the pneumothorax and nodule features stage 1 had built; frozen, the language model learned to
    read the tower in a way that a LoRA run could not teach small effusions (benchmarks/RESULTS-alignment.md)."""
    tower = list(model.model.vision_tower.parameters())
    rest = [p for p in model.parameters() if all(p is not t for t in tower)]
    optimizer = torch.optim.AdamW([{"params": tower, "lr": 1e-4}, {"params": rest}], lr=1e-3, weight_decay=1e-2)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=200, num_training_steps=steps)
    model.train()
    progress = tqdm(range(steps), desc="VLM", unit="step")
    for _ in progress:
        index = torch.randint(len(studies), (batch_size,), generator=generator).tolist()
        batch = collator([studies[i] for i in index])
        loss = report_token_loss(model, {k: v for k, v in batch.items() if torch.is_tensor(v)})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()


def phantom_studies(images: np.ndarray, records: list[dict]) -> list[dict]:
    """Phantoms as the studies ReportCollator batches: one RGB image, the impression as the report."""
    return [{"images": [to_pil_rgb(image / 255)], "report": record["impression"], "indication": None, "row_id": str(i)}
            for i, (image, record) in enumerate(zip(images, records))]


def pretrain_report(args) -> None:
    generator = torch.Generator().manual_seed(args.seed)
    model, processor = build_tiny_vlm(BUILTIN_TINY_VLMS[BUILTIN_TINY_VLM], seed=args.seed)
    family = family_of(model)
    collator = ReportCollator(processor, family, REPORT_INSTRUCTION, max_length=256, eos_token_id=end_token_id(model))
    images, records = draw_phantoms(args.num_images, size=128)
    studies = phantom_studies(images, records)
    train_vision_tower(model, processor, studies, args.vision_steps, batch_size=32, generator=generator)
    train_vlm(model, collator, studies, args.steps, batch_size=16, generator=generator)
    path = save_shipped_weights({"model": model}, SHIPPED_TINY_VLM, TINY_VLM_VERSION, LEFT_OUT_OF_PRETRAINING, "report")
    print(f"Wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    held_out = [make_phantom(PRETRAIN_PHANTOM_SEED * 1_000_003 + args.num_images + i, 128) for i in range(8)]
    encoded = encode_prompts(processor, family, [REPORT_INSTRUCTION] * len(held_out), [[to_pil_rgb(image)] for image, _ in held_out])
    with torch.no_grad():
        generated = model.generate(**encoded, max_new_tokens=48, do_sample=False)
    texts = processor.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    for (_, record), text in zip(held_out, texts):
        print(f"reference: {record['impression']}\ngenerated: {text.strip()}\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)
    t2i = tasks.add_parser("text-to-image", help="the tiny Stable Diffusion base (builtin:tiny-sd)")
    t2i.add_argument("--num_images", type=int, default=4000)
    t2i.add_argument("--vae_steps", type=int, default=1500)
    t2i.add_argument("--denoiser_steps", type=int, default=3500)
    t2i.set_defaults(run=pretrain_text_to_image)
    report = tasks.add_parser("report", help="the tiny LLaVA base (builtin:tiny-llava)")
    report.add_argument("--num_images", type=int, default=4000)
    report.add_argument("--vision_steps", type=int, default=6000, help="stage 1: vision tower + projector")
    report.add_argument("--steps", type=int, default=2000, help="stage 2: every weight, report loss")
    report.set_defaults(run=pretrain_report)
    for sub in (t2i, report):
        sub.add_argument("--seed", type=int, default=0)
    t2i.add_argument("--samples_dir", type=Path, help="also save a grid of samples (one row per prompt) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    args.run(args)


if __name__ == "__main__":
    main()
