"""Report LoRA training speed and memory (medfm's recipe as users run it): the loss on logits of the report tokens
only (medfm) vs the model's own loss, which applies the output layer at every position, image tokens included (the
reference: what `model(**batch).loss` in a plain Trainer / SFTTrainer loop does). Same data, seed and steps.

    python benchmarks/report_throughput.py                                       # CPU, recipes/configs/demo-report.yaml
    python benchmarks/report_throughput.py --config recipes/configs/qwen2.5-vl-3b-mimic-cxr.yaml --train_data_dir ...

Each arm runs in its own process, the arms taking turns --repeats times (medians). Counts, per optimizer step, the
report tokens the loss is on and all tokens the model reads (instruction, image tokens, report); steady state,
after the first step. Results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from results import medians, run_in_turns, write_section  # benchmarks/results.py, next to this script
from train_throughput import HEADER, RESULTS, machine

import medfm.train.report
from medfm.config import parse_train_config
from medfm.data.report_batches import IGNORE_INDEX
from medfm.train.report import ReportLoRARecipe

ARMS = {"reference": "model's own loss (logits at every position)", "medfm": "medfm (logits of report tokens only)"}
MEASURES = {"samples_per_s": ("samples/s", "{:.2f}"), "report_tokens_per_s": ("report tokens/s (in the loss)", "{:.0f}"),
            "tokens_per_s": ("tokens/s (all the model reads)", "{:.0f}"), "peak_rss_mib": ("peak RSS, MiB", "{:.0f}"),
            "peak_cuda_mib": ("peak CUDA memory, MiB", "{:.0f}"), "last_loss": ("loss at the last step", "{:.4f}")}


def run_arm(arm: str, config_path: str, steps: int, recipe_flags: list[str]) -> dict:
    if arm == "reference":  # the recipe unchanged but for its loss
        medfm.train.report.report_token_loss = lambda model, batch: model(**batch).loss
    with tempfile.TemporaryDirectory() as work:
        config = parse_train_config(["--config", config_path, "--max_train_steps", str(steps), "--output_dir", work,
                                     "--num_validation_samples", "0", "--checkpointing_steps", str(10**9), "--report_to", "none", *recipe_flags])
        recipe = ReportLoRARecipe(config)
        recipe.setup()
        counts, ends, losses = [], [], []
        step = recipe.training_step

        def counted_step(batch):
            counts.append((int((batch["labels"] != IGNORE_INDEX).sum()), int(batch["attention_mask"].sum()), len(batch["labels"])))
            loss = step(batch)
            losses.append(loss.item())
            ends.append(time.perf_counter())
            return loss

        recipe.training_step = counted_step
        recipe.train()
    seconds = ends[-1] - ends[0]
    report_tokens, all_tokens, samples = (sum(column[1:]) for column in zip(*counts))
    return {"samples_per_s": samples / seconds, "report_tokens_per_s": report_tokens / seconds, "tokens_per_s": all_tokens / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None, "last_loss": losses[-1]}


def table(config, args, recipe_flags: list[str], runs: dict[str, list[dict]]) -> str:
    median = medians(runs, MEASURES)
    lines = [f"Machine: {machine()}",
             f"Setup: {' '.join([args.config, *recipe_flags])}, base {config.pretrained_model_name_or_path}, batch {config.train_batch_size}, "
             f"{args.max_train_steps} steps, precision {config.mixed_precision or 'no'}, LoRA r {config.rank}"
             f"{' + vision tower' if config.lora_on_vision_tower else ''}, trained fully: {', '.join(config.modules_to_save or []) or 'none'}"
             f"{' + projector' if config.train_projector else ''}; medians of {args.repeats} runs per arm, arms taking turns", "",
             "| | " + " | ".join(ARMS.values()) + " |", "|---|---|---|"]
    for key, (label, fmt) in MEASURES.items():
        if median["reference"][key] is not None:
            lines.append(f"| {label} | " + " | ".join(fmt.format(median[arm][key]) for arm in ARMS) + " |")
    lines.append(f"| samples/s vs reference | 1.00x | **{median['medfm']['samples_per_s'] / median['reference']['samples_per_s']:.2f}x** |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/configs/demo-report.yaml")
    parser.add_argument("--max_train_steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3, help="runs per arm (medians reported)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the markdown file whose section this setup replaces")
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)  # internal: run one arm in this process
    args, recipe_flags = parser.parse_known_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.config, args.max_train_steps, recipe_flags)))
        return
    runs = run_in_turns(list(ARMS), args.repeats, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])])
    config = parse_train_config(["--config", args.config, *recipe_flags])
    text = table(config, args, recipe_flags, runs)
    print(text)
    write_section(args.results, HEADER, f"Report LoRA training: {config.pretrained_model_name_or_path}, {config.task}", text)


if __name__ == "__main__":
    main(sys.argv[1:])
