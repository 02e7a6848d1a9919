"""Images/s of `medfm generate` (synthetic-dataset generation): batched vs one prompt at a time, same prompts and seeds.

    python benchmarks/generation_throughput.py                                         # CPU, shipped tiny adapter
    python benchmarks/generation_throughput.py --adapter me/my-adapter --device cuda --num_prompts 64

Both arms load the pipeline once (not timed) and write PNGs + metadata.jsonl through medfm.generate.generate_images,
so the time includes PNG encoding, as a user's run does. Results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from results import write_section  # benchmarks/results.py, next to this script
from train_throughput import HEADER, RESULTS, machine

from medfm.data.phantom import make_phantom
from medfm.generate import generate_images, load_text_to_image_pipeline


def timed_generation(pipe, adapter: str, prompts: list[str], folder: Path, batch_size: int, steps: int) -> tuple[float, list[Path]]:
    start = time.perf_counter()
    paths = generate_images(prompts, folder, adapter=adapter, pipe=pipe, batch_size=batch_size, num_inference_steps=steps, seed=0)
    return time.perf_counter() - start, paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="adapters/phantom-text-to-image")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--num_prompts", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    pipe, _ = load_text_to_image_pipeline(args.adapter, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    prompts = [make_phantom(i, 32)[1]["impression"] for i in range(args.num_prompts)]
    seconds, outputs = {}, {}
    with tempfile.TemporaryDirectory() as work:
        generate_images(prompts[:1], Path(work) / "warmup", adapter=args.adapter, pipe=pipe, num_inference_steps=2)
        for batch_size in (1, args.batch_size):
            seconds[batch_size], paths = timed_generation(pipe, args.adapter, prompts, Path(work) / f"batch-{batch_size}", batch_size, args.steps)
            outputs[batch_size] = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in paths])
    difference = float(np.abs(outputs[1] - outputs[args.batch_size]).max())
    size = outputs[1].shape[1]
    lines = [f"Machine: {machine()}", f"Setup: adapter {args.adapter}, {size} px, {args.steps} steps, guidance 7.5, {args.num_prompts} prompts "
             "(phantom impressions), one image each; PNGs and metadata.jsonl written", "",
             "| batch size | images/s | speed-up |", "|---|---|---|"]
    for batch_size, s in seconds.items():
        lines.append(f"| {batch_size} | {args.num_prompts / s:.2f} | {seconds[1] / s:.2f} |")
    lines.append(f"\nLargest pixel difference between the two runs (0–255): {difference:.0f} (same seeds; batching changes float rounding only)")
    text = "\n".join(lines)
    print(text)
    write_section(RESULTS, HEADER, f"Generation (medfm generate): {size} px, {args.device}", text)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
