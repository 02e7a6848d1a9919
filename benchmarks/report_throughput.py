"""Tokens/s of report LoRA training (medfm's recipe as users run it), for the built-in demo or any config.

    python benchmarks/report_throughput.py                                       # CPU, recipes/configs/demo-report.yaml
    python benchmarks/report_throughput.py --config recipes/configs/qwen2.5-vl-3b-mimic-cxr.yaml --train_data_dir ...

Counts, per optimizer step, the report tokens the loss is on and all tokens the model reads (instruction, image
tokens, report); steady state, after the first step. Results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time

from results import write_section  # benchmarks/results.py, next to this script
from train_throughput import HEADER, RESULTS, machine

from medfm.config import parse_train_config
from medfm.data.report_batches import IGNORE_INDEX
from medfm.train.report import ReportLoRARecipe


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/configs/demo-report.yaml")
    parser.add_argument("--max_train_steps", type=int, default=60)
    args, recipe_flags = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as work:
        config = parse_train_config(["--config", args.config, "--max_train_steps", str(args.max_train_steps), "--output_dir", work,
                                     "--num_validation_samples", "0", "--checkpointing_steps", str(10**9), "--report_to", "none", *recipe_flags])
        recipe = ReportLoRARecipe(config)
        recipe.setup()
        counts, ends = [], []
        step = recipe.training_step

        def counted_step(batch):
            counts.append((int((batch["labels"] != IGNORE_INDEX).sum()), int(batch["attention_mask"].sum()), len(batch["labels"])))
            loss = step(batch)
            loss.item()
            ends.append(time.perf_counter())
            return loss

        recipe.training_step = counted_step
        recipe.train()
    seconds = ends[-1] - ends[0]
    report_tokens, all_tokens, samples = (sum(column[1:]) for column in zip(*counts))
    text = "\n".join([
        f"Machine: {machine()}",
        f"Setup: {' '.join([args.config, *recipe_flags])}, base {config.pretrained_model_name_or_path}, batch {config.train_batch_size}, "
        f"{args.max_train_steps} steps, precision {config.mixed_precision or 'no'}, LoRA r {config.rank}"
        f"{' + vision tower' if config.lora_on_vision_tower else ''}, trained fully: {', '.join(config.modules_to_save or []) or 'none'}"
        f"{' + projector' if config.train_projector else ''}", "",
        "| samples/s | report tokens/s (in the loss) | tokens/s (all the model reads) | peak RSS, MiB |", "|---|---|---|---|",
        f"| {samples / seconds:.2f} | {report_tokens / seconds:.0f} | {all_tokens / seconds:.0f} | "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} |"])
    print(text)
    write_section(RESULTS, HEADER, f"Report LoRA training: {config.pretrained_model_name_or_path}, {config.task}", text)


if __name__ == "__main__":
    main(sys.argv[1:])
