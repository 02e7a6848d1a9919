"""Sana LoRA training speed and memory: medfm's Sana recipe vs diffusers' own `train_dreambooth_lora_sana.py`.

Both train the same Sana base (a tiny one built from configs and saved as a plain diffusers folder, or any Sana folder)
on the same data: phantoms written as an imagefolder whose per-image captions are the report impressions, which the
diffusers script reads through `--dataset_name DIR --caption_column impression`. Same resolution, batch, steps, rank,
learning rate, LoRA targets, timestep weighting, prompt (SanaPipeline's complex human instruction + the caption, as
medfm encodes it), precision and seed. medfm runs `recipes/configs/sana-0.6b-mimic-cxr.yaml` with those
keys overridden. The diffusers script is not part of medfm: it is read at run time from a diffusers checkout
(`--diffusers_repo`: a git directory, e.g. the one `git clone --bare https://github.com/huggingface/diffusers` makes, or
a work tree), written to a temporary folder and run there. Each arm runs in its own process (its peak RSS is its own);
the arms take turns, --repeats times, so a busy machine slows them alike; the table gives medians. Reports steps/s after
--warmup_steps, whole-run time (start of the arm to the adapter saved), peak RSS and peak CUDA memory.

The diffusers script with per-image captions re-encodes every caption with Gemma 2 at every step; with --cache_latents
it also pairs cached latents with the wrong captions (diffusers issue #14430: latents cached in one shuffled pass are
looked up by step in later, differently shuffled passes). `--check_cache_pairing` measures that with the script's own
dataset and data loader, without training.

    python benchmarks/sana_throughput.py --diffusers_repo /path/to/diffusers.git            # CPU, tiny Sana, 64 px
    python benchmarks/sana_throughput.py --diffusers_repo ... --check_cache_pairing         # #14430 on per-image captions
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from results import arms_table, run_in_turns, write_runs_json, write_section  # noqa: E402  (benchmarks/results.py, next to this script)
from train_throughput import HEADER, RESULTS, StepClock, machine  # noqa: E402

RECIPE = REPO / "recipes" / "configs" / "sana-0.6b-mimic-cxr.yaml"
SCRIPT = "examples/dreambooth/train_dreambooth_lora_sana.py"
CAPTION_COLUMN = "impression"  # the phantoms' impression column: what medfm's recipe (report_section: impression) trains on


def tiny_sana_base(folder: Path) -> str:
    from medfm.models.tiny_diffusion import build_tiny_sana

    if not (folder / "model_index.json").exists():
        build_tiny_sana().save_pretrained(folder)
    return str(folder)


def diffusers_script(repo: str, target: Path) -> Path:
    """The training script from a diffusers checkout: a work tree's file, else `git show HEAD:` from a (bare) git directory."""
    work_tree_file = Path(repo) / SCRIPT
    if work_tree_file.exists():
        target.write_text(work_tree_file.read_text())
    else:
        target.write_text(subprocess.run(["git", "--git-dir", repo, "show", f"HEAD:{SCRIPT}"], check=True, capture_output=True, text=True).stdout)
    return target


def diffusers_commit(repo: str) -> str:
    """The diffusers commit the script was read from (a work tree or a git directory)."""
    where = ["-C", repo] if (Path(repo) / SCRIPT).exists() else ["--git-dir", repo]
    return subprocess.run(["git", *where, "rev-parse", "--short=12", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location("train_dreambooth_lora_sana", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_args(args, work: Path, cache_latents: bool = False) -> list[str]:
    """The diffusers script's flags for the shared setup (center crop and no flip: what medfm does with radiographs)."""
    flags = ["--pretrained_model_name_or_path", args.base_path, "--dataset_name", args.data_dir, "--image_column", "image",
             "--caption_column", CAPTION_COLUMN, "--instance_prompt", "a chest radiograph", "--output_dir", str(work / "diffusers-out"),
             "--resolution", str(args.resolution), "--center_crop", "--train_batch_size", str(args.train_batch_size),
             "--max_train_steps", str(args.max_train_steps), "--rank", str(args.rank), "--lora_alpha", str(args.rank), "--lora_layers", args.lora_layers,
             "--learning_rate", str(args.learning_rate),
             "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--weighting_scheme", args.weighting_scheme,
             "--max_sequence_length", str(args.max_sequence_length), "--mixed_precision", args.mixed_precision, "--seed", str(args.seed),
             "--checkpointing_steps", str(10**9), "--dataloader_num_workers", str(args.dataloader_num_workers), "--report_to", "tensorboard"]
    flags += ["--use_8bit_adam"] * args.use_8bit_adam + ["--gradient_checkpointing"] * args.gradient_checkpointing
    return flags + ["--cache_latents"] * cache_latents


# ------------------------------------------------------------------------------------------------ the arms
def run_medfm(args, work: Path) -> StepClock:
    """medfm's Sana recipe as users run it (cold encoding cache in a fresh folder), the shared setup overriding its keys."""
    from medfm.config import TrainConfig, load_yaml
    from medfm.train.text_to_image import TextToImageLoRARecipe

    overrides = dict(pretrained_model_name_or_path=args.base_path, train_data_dir=args.data_dir, output_dir=str(work / "medfm-out"),
                     cache_dir=str(work / "cache"), resolution=args.resolution, train_batch_size=args.train_batch_size, gradient_accumulation_steps=1,
                     max_train_steps=args.max_train_steps, rank=args.rank, lora_alpha=args.rank, lora_layers=args.lora_layers, learning_rate=args.learning_rate,
                     lr_scheduler="constant", lr_warmup_steps=0, weighting_scheme=args.weighting_scheme, max_sequence_length=args.max_sequence_length,
                     mixed_precision=args.mixed_precision, use_8bit_adam=args.use_8bit_adam, gradient_checkpointing=args.gradient_checkpointing,
                     seed=args.seed, dataloader_num_workers=args.dataloader_num_workers, validation_prompt=[], validation_steps=None,
                     checkpointing_steps=10**9, report_to="tensorboard", verify_images=False)  # both arms log to TensorBoard
    clock = StepClock()
    recipe = TextToImageLoRARecipe(TrainConfig(**{**load_yaml(RECIPE), **overrides}))
    recipe.setup()
    training_step, optimizer_step = recipe.training_step, recipe.optimizer.step

    def timed_training_step(batch):
        loss = training_step(batch)
        clock.losses.append(loss.item())
        return loss

    def timed_optimizer_step(*step_args, **kwargs):
        optimizer_step(*step_args, **kwargs)
        clock.tick(args.train_batch_size)

    recipe.training_step, recipe.optimizer.step = timed_training_step, timed_optimizer_step
    recipe.train()
    recipe.save_adapter()
    recipe.cleanup()
    return clock


def run_diffusers(args, work: Path, cache_latents: bool = False) -> StepClock:
    """diffusers' script in this process (so peak RSS is comparable), unchanged but observed: its learning-rate scheduler's
    step (called once per optimizer update) ticks the clock and its accelerator's backward records the loss."""
    from medfm.models.families.sana import COMPLEX_HUMAN_INSTRUCTION

    script = load_script(diffusers_script(args.diffusers_repo, work / "train_dreambooth_lora_sana.py"))
    script.args = script.parse_args(script_args(args, work, cache_latents))  # its dataset class reads the module-level `args`
    # The prompt SanaPipeline (and medfm) encodes: the pipeline's instruction list. The script's --complex_human_instruction
    # flag is a string, which the pipeline's "\n".join would split into characters, so it is set here, as a list.
    script.args.complex_human_instruction = COMPLEX_HUMAN_INSTRUCTION
    clock = StepClock()
    make_scheduler = script.get_scheduler

    class LossRecordingAccelerator(script.Accelerator):
        def backward(self, loss, **kwargs):
            clock.losses.append(loss.item())
            super().backward(loss, **kwargs)

        def init_trackers(self, project_name, config=None, **kwargs):  # TensorBoard's hparams take no lists: the instruction logged as text
            config = {key: "\n".join(value) if isinstance(value, list) else value for key, value in (config or {}).items()}
            super().init_trackers(project_name, config=config, **kwargs)

    def timed_get_scheduler(*sched_args, **kwargs):
        scheduler = make_scheduler(*sched_args, **kwargs)
        step = scheduler.step

        def timed_step(*step_args, **step_kwargs):
            step(*step_args, **step_kwargs)
            clock.tick(args.train_batch_size)

        scheduler.step = timed_step
        return scheduler

    script.get_scheduler, script.Accelerator = timed_get_scheduler, LossRecordingAccelerator
    script.main(script.args)
    return clock


ARMS = {"diffusers": run_diffusers, "medfm": run_medfm, "diffusers-cache_latents": lambda *a: run_diffusers(*a, cache_latents=True)}
ARM_LABELS = {"diffusers": "diffusers train_dreambooth_lora_sana.py", "medfm": "medfm (Sana recipe)",
              "diffusers-cache_latents": "diffusers script --cache_latents (mispairs, #14430)"}
MEASURES = {"steps_per_s": ("steps/s (after warm-up)", "{:.2f}"), "whole_run_s": ("whole run (start to adapter saved), s", "{:.1f}"),
            "time_to_first_step_s": ("time to first step, s", "{:.1f}"), "peak_rss_mib": ("peak RSS, MiB", "{:.0f}"),
            "peak_cuda_mib": ("peak CUDA memory, MiB", "{:.0f}"), "loss_first_quarter": ("loss, first quarter of steps", "{:.4f}"),
            "loss_last_quarter": ("loss, last quarter of steps", "{:.4f}")}


def measure(args, arm: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        clock = ARMS[arm](args, Path(work))
        clock.start = start
        summary = clock.summary()
        summary["whole_run_s"] = time.perf_counter() - start
    warm = clock.ends[args.warmup_steps - 1:] if args.warmup_steps else [start, *clock.ends]
    summary["steps_per_s"] = (len(warm) - 1) / (warm[-1] - warm[0])
    return summary


# ------------------------------------------------------------------------------------------------ #14430
def check_cache_pairing(args, epochs: int = 3) -> dict:
    """Run the diffusers script's own dataset and data loader as it does with --cache_latents: one shuffled pass fills
    `latents_cache` (index = step), the training passes read `latents_cache[step]` next to the batch's captions.
    Counts the samples whose cached latent comes from another image, and from an image with another caption."""
    from accelerate.utils import set_seed

    with tempfile.TemporaryDirectory() as work:
        script = load_script(diffusers_script(args.diffusers_repo, Path(work) / "train_dreambooth_lora_sana.py"))
        script.args = script.parse_args(script_args(args, Path(work), cache_latents=True))
        set_seed(script.args.seed)
        dataset = script.DreamBoothDataset(instance_data_root=None, instance_prompt=script.args.instance_prompt, class_prompt=None,
                                           class_data_root=None, size=script.args.resolution, repeats=1, center_crop=True)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                                             collate_fn=lambda examples: script.collate_fn(examples, False))
        cached = [(batch["pixel_values"], batch["prompts"]) for batch in loader]  # the caching pass
        samples = other_image = other_caption = 0
        for _ in range(epochs):
            for step, batch in enumerate(loader):
                pixels, prompts = cached[step]
                same_image = (pixels - batch["pixel_values"]).flatten(1).abs().amax(1) == 0
                samples += len(prompts)
                other_image += int((~same_image).sum())
                other_caption += sum(a != b for a, b in zip(prompts, batch["prompts"]))
    return {"samples": samples, "latent_from_another_image": other_image, "latent_with_another_caption": other_caption, "epochs": epochs}


# ------------------------------------------------------------------------------------------------ driver
def report(args, runs: dict[str, list[dict]]) -> str:
    lines = [f"Machine: {machine()}", f"diffusers script: `{SCRIPT}` at commit {diffusers_commit(args.diffusers_repo)}",
             f"Setup: base {args.base}, {args.resolution} px, batch {args.train_batch_size}, {args.max_train_steps} steps ({args.warmup_steps} warm-up), "
             f"rank {args.rank} on {args.lora_layers}, weighting {args.weighting_scheme}, {args.max_sequence_length} prompt tokens, "
             f"precision {args.mixed_precision}, 8-bit AdamW {args.use_8bit_adam}, gradient checkpointing {args.gradient_checkpointing}, "
             f"{args.num_images} phantom images with per-image captions, seed {args.seed}; medians of {args.repeats} runs per arm, arms taking turns", "",
             *arms_table(runs, ARM_LABELS, MEASURES, "steps_per_s", "diffusers")]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers_repo", required=True, help="a diffusers checkout: git directory (bare is fine) or work tree")
    parser.add_argument("--base", default="tiny", help="tiny (built from configs) or a Sana diffusers folder")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--max_train_steps", type=int, default=60)
    parser.add_argument("--warmup_steps", type=int, default=5, help="steps left out of steps/s (model warm-up, cache filling)")
    parser.add_argument("--num_images", type=int, default=64, help="phantom images in the training set")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lora_layers", default="to_k,to_q,to_v,to_out.0", help="both arms (medfm's default; the script's is to_k,to_q,to_v)")
    parser.add_argument("--weighting_scheme", default="logit_normal", help="both arms (the recipe's choice)")
    parser.add_argument("--max_sequence_length", type=int, default=300, help="Gemma prompt tokens, both arms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--use_8bit_adam", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--arms", nargs="*", choices=[arm for arm in ARMS if arm != "diffusers"], default=["medfm"],
                        help="besides the diffusers script, which always runs")
    parser.add_argument("--repeats", type=int, default=3, help="runs per arm (medians reported)")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--check_cache_pairing", action="store_true", help="only count #14430's mispairings (no training)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the markdown file whose section this setup replaces")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)  # internal: run one arm in this process
    parser.add_argument("--data_dir", help=argparse.SUPPRESS)
    parser.add_argument("--base_path", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.arm:
        print(json.dumps(measure(args, args.arm)))
        return
    from medfm.data.phantom import write_phantom_dataset

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "" if args.device == "cpu" else os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    with tempfile.TemporaryDirectory() as work:
        args.data_dir = str(write_phantom_dataset(Path(work) / "data", num_images=args.num_images, seed=args.seed, size=args.resolution))
        args.base_path = tiny_sana_base(Path(work) / "tiny-sana") if args.base == "tiny" else args.base
        if args.check_cache_pairing:
            result = check_cache_pairing(args)
            text = (f"diffusers' `{SCRIPT}` (commit {diffusers_commit(args.diffusers_repo)}) with `--cache_latents` and per-image captions "
                    f"(`--dataset_name` imagefolder, `--caption_column {CAPTION_COLUMN}`): its own dataset and shuffled data loader, one caching "
                    f"pass, then {result['epochs']} training passes reading `latents_cache[step]`. {args.num_images} phantoms, "
                    f"batch {args.train_batch_size}, seed {args.seed}.\n\n"
                    f"| samples trained | latent from another image | latent from an image with another caption |\n|---|---|---|\n"
                    f"| {result['samples']} | {result['latent_from_another_image']} | {result['latent_with_another_caption']} |")
            print(text)
            write_section(args.results, HEADER, "Sana DreamBooth script: cached latents vs captions (diffusers #14430)", text)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1))
            return
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--data_dir", args.data_dir, "--base_path", args.base_path]
        runs = run_in_turns(["diffusers", *args.arms], args.repeats, command, lambda arm, repeat: env)
    text = report(args, runs)
    print(text)
    write_section(args.results, HEADER, f"Sana LoRA training vs diffusers' DreamBooth script: {args.base} base, {args.resolution} px, {args.device}", text)
    if args.json:
        write_runs_json(args.json, machine(), args, runs, text)


if __name__ == "__main__":
    main()
