"""Do generated reports name the findings the phantom shows? Base vs adapter on held-out phantoms.

    python benchmarks/report_findings.py --adapter medfm-report-lora --num_images 64

A finding counts as named when medfm's CheXpert labeler marks it positive in the generated report.
Results are written to benchmarks/RESULTS-report-findings.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

from medfm.data.phantom import make_phantom
from medfm.data.report_batches import full_instruction
from medfm.data.studies import to_pil_rgb
from medfm.eval.labeler import label_report
from medfm.generate import adapter_training_config, generate_reports, load_report_model

FINDINGS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Consolidation", "Lung Lesion", "Support Devices")


def positive_mentions(report: str) -> set[str]:
    labels = label_report(report)
    return {name for name in FINDINGS if labels[name] == 1.0}


def score(reports: list[str], records: list[dict]) -> dict[str, float]:
    present = [(r, label) for r, rec in zip(reports, records) for label in FINDINGS if rec[label] == 1]
    absent = [(r, label) for r, rec in zip(reports, records) for label in FINDINGS if rec[label] != 1]
    hit = sum(label in positive_mentions(r) for r, label in present) / max(len(present), 1)
    false = sum(label in positive_mentions(r) for r, label in absent) / max(len(absent), 1)
    return {"present findings named": hit, "absent findings named": false, "pairs present": len(present)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7, help="Phantom seed offset (the training phantoms use seed 0).")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    args = parser.parse_args()
    config = adapter_training_config(args.adapter)
    phantoms = [make_phantom(args.seed * 1_000_003 + i, 256) for i in range(args.num_images)]
    images = [[to_pil_rgb(image)] for image, _ in phantoms]
    records = [record for _, record in phantoms]
    instructions = [full_instruction(config["instruction"], None)] * len(images)
    rows = []
    for name, adapter in (("base", None), ("base + LoRA", args.adapter)):
        model, processor, family = load_report_model(adapter, config["pretrained_model_name_or_path"])
        reports = generate_reports(model, processor, family, images, instructions, max_new_tokens=args.max_new_tokens)
        rows.append((name, score(reports, records), reports[0]))
    lines = ["| model | present findings named | absent findings named (false positives) |", "|---|---|---|"]
    lines += [f"| {name} | {s['present findings named']:.3f} | {s['absent findings named']:.3f} |" for name, s, _ in rows]
    text = (f"Adapter `{args.adapter}`, {args.num_images} held-out phantoms (seed {args.seed}), "
            f"{rows[0][1]['pairs present']} (image, present finding) pairs, greedy decoding.\n\n" + "\n".join(lines)
            + "\n\nFirst report, base: " + rows[0][2][:200] + "\n\nFirst report, adapted: " + rows[1][2][:200] + "\n")
    print(text)
    command = "python benchmarks/report_findings.py " + " ".join(sys.argv[1:])
    Path(__file__).with_name("RESULTS-report-findings.md").write_text(
        f"# Report findings: base vs adapter\n\nReproduce: `{command}` (adapter from `accelerate launch recipes/train_lora.py "
        f"--config recipes/configs/demo-report.yaml`; {platform.machine()}, {os.cpu_count()} CPU cores, no GPU).\n\n" + text)


if __name__ == "__main__":
    main()
