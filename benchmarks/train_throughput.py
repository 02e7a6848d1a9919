"""Text-to-image LoRA training speed and memory: medfm's recipe vs a loop that does per step what diffusers'
`examples/text_to_image/train_text_to_image_lora.py` does (VAE-encode every image, text-encode every caption).

Same base, data, batch, steps, seed, LoRA, optimizer and precision; each arm runs in its own process so peak
RSS and peak CUDA memory are its own. Arms: the reference, medfm's recipe, and medfm's recipe with
--torch_compile (compiling from a cold cache). The arms take turns, --repeats times, so a busy machine slows
them alike; the table gives medians. Reports samples/s, time to the end of the first optimizer step (model
loading, building medfm's encoding cache from cold, compiling), peak RSS, peak CUDA memory, the loss at start
and end, and the ratios to the reference.

    python benchmarks/train_throughput.py                               # CPU, tiny built-in base, 128 px
    python benchmarks/train_throughput.py --base sd15 --device cuda --resolution 512 --mixed_precision bf16 \\
        --use_8bit_adam --gradient_checkpointing --train_batch_size 8 --max_train_steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from results import arms_table, run_in_turns, write_runs_json, write_section  # noqa: E402  (benchmarks/results.py, next to this script)

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = """# Speed and memory

medfm's recipe against a reference loop on the same work, both measured in the same run (see each script's docstring)."""


def build_sd15_architecture(folder: Path) -> None:
    """Stable Diffusion 1.5's published architecture (UNet, VAE, CLIP ViT-L/14 text encoder), randomly initialised: nothing downloaded."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from medfm.models.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                                cross_attention_dim=768, attention_head_dim=8)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, skip_prk_steps=True,
                              steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)


def resolve(base: str) -> str:
    from medfm.models.diffusion import resolve_base
    from medfm.paths import build_once, medfm_home

    if base == "tiny":
        return resolve_base("builtin:tiny-sd")
    if base == "sd15":
        return str(build_once(medfm_home() / "bases" / "sd15-architecture-random", "model_index.json", build_sd15_architecture))
    return base


# ------------------------------------------------------------------------------------------------ the arms
def run_medfm(args, data_dir: str, work: Path, torch_compile: bool = False) -> dict:
    """medfm's recipe as users run it (cold encoding cache in a fresh folder)."""
    from medfm.config import TrainConfig
    from medfm.train.text_to_image import TextToImageLoRARecipe

    config = TrainConfig(pretrained_model_name_or_path=args.base_path, train_data_dir=data_dir, output_dir=str(work / "medfm-out"),
                         cache_dir=str(work / "cache"), resolution=args.resolution, train_batch_size=args.train_batch_size,
                         max_train_steps=args.max_train_steps, learning_rate=args.learning_rate, seed=args.seed, rank=args.rank,
                         mixed_precision=args.mixed_precision, use_8bit_adam=args.use_8bit_adam, gradient_checkpointing=args.gradient_checkpointing,
                         torch_compile=torch_compile, dataloader_num_workers=args.dataloader_num_workers, validation_prompt=[],
                         checkpointing_steps=10**9, report_to="none", verify_images=False)
    clock = StepClock()
    recipe = TextToImageLoRARecipe(config)
    recipe.setup()
    training_step, optimizer_step = recipe.training_step, recipe.optimizer.step
    batch_sizes = []

    def timed_training_step(batch):
        loss = training_step(batch)
        clock.losses.append(loss.item())
        batch_sizes.append(len(batch["index"]))
        return loss

    def timed_optimizer_step(*args, **kwargs):
        optimizer_step(*args, **kwargs)
        clock.tick(batch_sizes[-1])

    recipe.training_step, recipe.optimizer.step = timed_training_step, timed_optimizer_step
    recipe.train()
    return clock.summary()


def run_reference(args, data_dir: str, work: Path) -> dict:
    """Per step what diffusers' train_text_to_image_lora.py does: decode, VAE-encode, text-encode, denoise, step."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from torch.utils.data import DataLoader

    from medfm.data.pairs import ImageReportDataset, collate_pairs, pairs_from_imagefolder
    from medfm.lora import attach_lora, lora_parameters
    from medfm.models.diffusion import load_pipeline

    clock = StepClock()
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    parts = load_pipeline(args.base_path)
    vae, text_encoder, unet, scheduler = parts.vae, parts.text_encoder, parts.unet, DDPMScheduler.from_config(parts.scheduler.config)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    attach_lora(unet, args.rank, args.rank, 0.0, ["to_k", "to_q", "to_v", "to_out.0"])
    for model in (vae, text_encoder, unet):
        model.to(accelerator.device, dtype=weight_dtype)
    cast_training_params(unet, dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    lora_layers = lora_parameters(unet)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(lora_layers, lr=args.learning_rate)
    else:
        optimizer = torch.optim.AdamW(lora_layers, lr=args.learning_rate)
    dataset = ImageReportDataset(pairs_from_imagefolder(data_dir), args.resolution, parts.tokenizer, verify_images=False)
    loader = DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate_pairs, num_workers=args.dataloader_num_workers,
                        generator=torch.Generator().manual_seed(args.seed))
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    unet.train()
    step = 0
    while step < args.max_train_steps:
        for batch in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
                noisy_latents = scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(lora_layers, 1.0)
                optimizer.step()
                optimizer.zero_grad()
            clock.losses.append(loss.item())
            clock.tick(len(batch["index"]))
            step += 1
            if step >= args.max_train_steps:
                break
    return clock.summary()


class StepClock:
    """Wall time from the arm's start to the end of each optimizer step, per-step losses, peak memory."""

    def __init__(self):
        self.start = time.perf_counter()
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.samples = 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def tick(self, batch_size: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # step ends are real, not kernel launches
        self.ends.append(time.perf_counter())
        self.samples += batch_size if len(self.ends) > 1 else 0

    def summary(self) -> dict:
        quarter = max(len(self.losses) // 4, 1)
        return {
            "time_to_first_step_s": self.ends[0] - self.start,
            "whole_run_s": self.ends[-1] - self.start,
            "samples_per_s": self.samples / (self.ends[-1] - self.ends[0]),  # steady state: after the first step
            "steps": len(self.ends),
            "loss_first_quarter": sum(self.losses[:quarter]) / quarter,
            "loss_last_quarter": sum(self.losses[-quarter:]) / quarter,
            "loss_last_quarter_sem": _sem(self.losses[-quarter:]),
            "losses": self.losses,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        }


def _sem(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1) / len(values)) ** 0.5


ARMS = {"reference": run_reference, "medfm": run_medfm, "medfm-compile": lambda *a: run_medfm(*a, torch_compile=True)}
ARM_LABELS = {"reference": "reference (diffusers-script loop)", "medfm": "medfm", "medfm-compile": "medfm --torch_compile"}
MEASURES = {"samples_per_s": ("samples/s (after the first step)", "{:.2f}"), "time_to_first_step_s": ("time to first step, s", "{:.1f}"),
            "whole_run_s": ("whole run (loading to last step), s", "{:.1f}"),
            "peak_rss_mib": ("peak RSS, MiB", "{:.0f}"), "peak_cuda_mib": ("peak CUDA memory, MiB", "{:.0f}"),
            "loss_first_quarter": ("loss, first quarter of steps", "{:.4f}"), "loss_last_quarter": ("loss, last quarter of steps", "{:.4f}")}


# ------------------------------------------------------------------------------------------------ driver
def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def report(args, runs: dict[str, list[dict]]) -> str:
    """Medians over the repeats; samples/s also as each arm's ratio to the reference and as the range seen."""
    lines = [f"Machine: {machine()}", f"Setup: base {args.base}, {args.resolution} px, batch {args.train_batch_size}, {args.max_train_steps} steps, "
             f"seed {args.seed}, rank {args.rank}, precision {args.mixed_precision}, 8-bit AdamW {args.use_8bit_adam}, gradient checkpointing "
             f"{args.gradient_checkpointing}, {args.num_images} phantom images; medians of {args.repeats} runs per arm, arms taking turns", "",
             *arms_table(runs, ARM_LABELS, MEASURES, "samples_per_s", "reference")]
    lines.append("\nLast-quarter loss ± standard error: " + ", ".join(
        f"{arm} {rs[0]['loss_last_quarter']:.4f} ± {rs[0]['loss_last_quarter_sem']:.4f}" for arm, rs in runs.items()))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="tiny", help="tiny (built-in), sd15 (SD 1.5 architecture, random init) or a diffusers folder")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--max_train_steps", type=int, default=200)
    parser.add_argument("--num_images", type=int, default=64, help="phantom images in the training set")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--use_8bit_adam", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="the reference always runs")
    parser.add_argument("--repeats", type=int, default=3, help="runs per arm (medians reported)")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the markdown file whose section this setup replaces")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)  # internal: run one arm in this process
    parser.add_argument("--data_dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.base_path = resolve(args.base)
    if args.arm:
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(ARMS[args.arm](args, args.data_dir, Path(work))))
        return
    from medfm.data.phantom import write_phantom_dataset

    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    arms = ["reference", *(arm for arm in args.arms if arm != "reference")]
    with tempfile.TemporaryDirectory() as work:
        data_dir = str(write_phantom_dataset(Path(work) / "data", num_images=args.num_images, seed=args.seed, size=args.resolution))
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--data_dir", data_dir]

        def env_for(arm: str, repeat: int) -> dict:  # torch.compile starts from a cold cache, as on a first run
            return {**env, "TORCHINDUCTOR_CACHE_DIR": str(Path(work) / f"inductor-{arm}-{repeat}")}

        runs = run_in_turns(arms, args.repeats, command, env_for)
    text = report(args, runs)
    print(text)
    title = f"Text-to-image LoRA training: {args.base} base, {args.resolution} px, {args.device}"
    write_section(args.results, HEADER, title, text)
    if args.json:
        write_runs_json(args.json, machine(), args, runs, text)


if __name__ == "__main__":
    main()
