"""Does a LoRA run teach the built-in bases the finding their pretraining left out? Base vs base + LoRA.

    python benchmarks/left_out_finding.py text-to-image --adapter adapters/phantom-text-to-image
    python benchmarks/left_out_finding.py report --adapter adapters/phantom-report

The built-in bases never saw a pleural effusion (medfm.models.shipped.LEFT_OUT_OF_PRETRAINING); the built-in
training phantoms show it in about a quarter of the images. Everything is measured on held-out phantoms
(seeds disjoint from pretraining, LoRA training and validation) and written to RESULTS-left-out-finding.md.

- text-to-image: a ResNet-18 trained on real phantoms to detect the finding looks at images generated for
  prompts that ask for it (the impressions of held-out phantoms that show it); detection rate vs the
  classifier's false-positive rate on real phantoms without it. FID (FID InceptionV3) of images generated for
  all held-out impressions against held-out real phantoms, with a randomly initialised base for scale.
- report: the labeler's F1 for the finding on reports generated for held-out phantoms (about a quarter show
  it), overall CheXpert-label F1 and BLEU-4 / ROUGE-L against the phantoms' own reports.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from results import write_section  # benchmarks/results.py, next to this script
from torchmetrics.functional.classification import binary_f1_score, binary_precision, binary_recall

from medfm.data.images import to_rgb_tensor
from medfm.data.phantom import make_phantom
from medfm.data.report_batches import full_instruction
from medfm.data.studies import to_pil_rgb
from medfm.eval.features import InceptionFeatures, extract_features
from medfm.eval.images import fid_kid, to_uint8_rgb
from medfm.eval.labeler import label_reports
from medfm.eval.report_metrics import evaluate_reports
from medfm.eval.utility import predict, train_classifier
from medfm.generate import adapter_training_config, base_of_adapter, generate_reports, load_report_model, load_text_to_image_pipeline
from medfm.models.diffusion import build_tiny_sd_pipeline
from medfm.models.shipped import LEFT_OUT_OF_PRETRAINING

FINDING = {"effusion": "Pleural Effusion"}[LEFT_OUT_OF_PRETRAINING]  # its CheXpert label
RESULTS = Path(__file__).with_name("RESULTS-left-out-finding.md")
CLASSIFIER_SIZE = 64
FIGURE_ROWS = 4


def held_out_phantoms(count: int, seed: int, size: int) -> list[tuple[np.ndarray, dict]]:
    return [make_phantom(seed * 1_000_003 + i, size) for i in range(count)]


def generate(pipe, prompts: list[str], steps: int, guidance: float, batch_size: int = 16, seed: int = 0) -> torch.Tensor:
    """uint8 (N, 3, H, W), one image per prompt, image i from seed `seed * 100_000 + i` (batched: one generator per image)."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed * 100_000 + start + i) for i in range(len(batch))]
        images.append(pipe(batch, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="np").images)
    return torch.from_numpy(np.round(np.concatenate(images) * 255).astype(np.uint8)).permute(0, 3, 1, 2)


def classifier_input(images: torch.Tensor) -> torch.Tensor:
    return torch.stack([to_rgb_tensor(image[0].float().numpy() / 255, CLASSIFIER_SIZE) for image in images])


def save_figure(images: torch.Tensor, path: Path) -> None:
    """uint8 (rows, columns, 3, H, W) -> one PNG grid."""
    rows, columns, _, height, width = images.shape
    grid = images.permute(0, 3, 1, 4, 2).reshape(rows * height, columns * width, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)


def finding_classifier(num_real: int, seed: int, epochs: int, size: int = 128) -> tuple[torch.Tensor, torch.nn.Module, float, float]:
    """(`num_real` held-out real phantoms as uint8, a ResNet-18 trained on the first 3/4 of them to detect the finding, its
    true- and false-positive rates on the rest)."""
    real = held_out_phantoms(num_real, seed, size)
    real_uint8 = torch.stack([to_uint8_rgb(image, size) for image, _ in real])
    has = torch.tensor([[float(record[FINDING] == 1.0)] for _, record in real])
    train, test = slice(0, num_real * 3 // 4), slice(num_real * 3 // 4, None)
    classifier = train_classifier(classifier_input(real_uint8[train]), has[train], epochs=epochs)
    real_scores = predict(classifier, classifier_input(real_uint8[test]))[:, 0]
    return real_uint8, classifier, float((real_scores[has[test, 0] == 1] > 0.5).float().mean()), float((real_scores[has[test, 0] == 0] > 0.5).float().mean())


def evaluation_prompts(num_generated: int, num_finding_prompts: int, seed: int) -> tuple[list[str], list[str]]:
    """(impressions of `num_generated` held-out phantoms, for FID; up to `num_finding_prompts` held-out impressions that ask for the finding)."""
    prompts_all = [record["impression"] for _, record in held_out_phantoms(num_generated, seed + 1, 16)]
    prompts_finding = [record["impression"] for _, record in held_out_phantoms(num_generated * 4, seed + 2, 16)
                       if record[FINDING] == 1.0][:num_finding_prompts]
    return prompts_all, prompts_finding


def text_to_image(args) -> str:
    size = 128
    real_uint8, classifier, true_positive_rate, false_positive_rate = finding_classifier(args.num_real, args.seed, args.classifier_epochs, size)
    train = slice(0, args.num_real * 3 // 4)
    prompts_all, prompts_finding = evaluation_prompts(args.num_generated, args.num_finding_prompts, args.seed)
    extractor = InceptionFeatures()
    real_features = extract_features(real_uint8, extractor)
    base = base_of_adapter(args.adapter)
    models = {"random init (no pretraining)": lambda: build_tiny_sd_pipeline(seed=0),
              "pretrained base": lambda: load_text_to_image_pipeline(None, base, device="cpu")[0],
              "base + LoRA": lambda: load_text_to_image_pipeline(args.adapter, base, device="cpu")[0]}
    rows, asked = [], {}
    for name, load in models.items():
        pipe = load()
        asked[name] = generate(pipe, prompts_finding, args.steps, args.guidance_scale)
        detected = predict(classifier, classifier_input(asked[name]))[:, 0] > 0.5
        fid = fid_kid(real_features, extract_features(generate(pipe, prompts_all, args.steps, args.guidance_scale), extractor))["fid"]
        rows.append(f"| {name} | {float(detected.float().mean()):.3f} | {fid:.1f} |")
    shown = prompts_finding[:FIGURE_ROWS]
    save_figure(torch.stack([asked["pretrained base"][:FIGURE_ROWS], asked["base + LoRA"][:FIGURE_ROWS]], dim=1), args.figure)
    figure = (f"![base vs base + LoRA]({os.path.relpath(args.figure, RESULTS.parent)})\n\nLeft: pretrained base, right: base + LoRA, "
              "same prompt and seed per row. Rows: " + " / ".join(f"\"{p}\"" for p in shown) + "\n\n")
    return figure + (f"Classifier (ResNet-18, {CLASSIFIER_SIZE} px) trained on {train.stop} real held-out phantoms; on {args.num_real - train.stop} "
            f"others it detects the finding in {true_positive_rate:.3f} of the images that show it and in {false_positive_rate:.3f} "
            f"of those that do not (false-positive rate).\n{len(prompts_finding)} prompts ask for the finding (one image each); FID: "
            f"{len(prompts_all)} generated images (one per held-out impression) vs {args.num_real} real held-out phantoms, "
            f"{size} px, {args.steps} steps, guidance {args.guidance_scale}.\n\n"
            "| model | finding detected when asked | FID vs real phantoms |\n|---|---|---|\n" + "\n".join(rows))


def report(args) -> str:
    config = adapter_training_config(args.adapter)
    phantoms = held_out_phantoms(args.num_images, args.seed, 256)
    images = [[to_pil_rgb(image)] for image, _ in phantoms]
    references = [record[config["report_section"]] for _, record in phantoms]
    truth = torch.tensor([record[FINDING] == 1.0 for _, record in phantoms]).int()
    instructions = [full_instruction(config["instruction"], None)] * len(images)
    rows, examples = [], []
    for name, adapter in (("pretrained base", None), ("base + LoRA", args.adapter)):
        model, processor, family = load_report_model(adapter, base_of_adapter(args.adapter), device="cpu")
        predictions = generate_reports(model, processor, family, images, instructions, max_new_tokens=args.max_new_tokens)
        named = torch.tensor([labels[FINDING] == 1.0 for labels in label_reports(predictions)]).int()
        metrics = {k: v["value"] for k, v in evaluate_reports(references, predictions, bootstrap_samples=0)["metrics"].items()}
        rows.append(f"| {name} | {float(binary_f1_score(named, truth)):.3f} ({float(binary_precision(named, truth)):.2f} / "
                    f"{float(binary_recall(named, truth)):.2f}) | {metrics['chexpert_f1_micro_14']:.3f} | "
                    f"{metrics['chexpert_f1_micro_5']:.3f} | {metrics['bleu4']:.3f} | {metrics['rougeL']:.3f} |")
        first = int(truth.argmax())
        examples.append(f"- {name}, a phantom with the finding: reference \"{references[first]}\" / generated \"{predictions[first]}\"")
    return (f"{args.num_images} held-out phantoms ({int(truth.sum())} show the finding), target section `{config['report_section']}`, "
            "greedy decoding; CheXpert labels from medfm's labeler on reference and generated text.\n\n"
            f"| model | {FINDING} F1 (precision / recall) | CheXpert F1 micro (14) | CheXpert F1 micro (5) | BLEU-4 | ROUGE-L |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\n" + "\n".join(examples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)
    t2i = tasks.add_parser("text-to-image")
    t2i.add_argument("--adapter", required=True)
    t2i.add_argument("--num_real", type=int, default=800)
    t2i.add_argument("--num_generated", type=int, default=128, help="images per model for FID")
    t2i.add_argument("--num_finding_prompts", type=int, default=64)
    t2i.add_argument("--classifier_epochs", type=int, default=10)
    t2i.add_argument("--steps", type=int, default=25)
    t2i.add_argument("--guidance_scale", type=float, default=4.0)
    t2i.add_argument("--seed", type=int, default=11)
    t2i.add_argument("--figure", type=Path, default=Path("docs/left-out-finding-text-to-image.png"), help="base vs base + LoRA, side by side")
    t2i.set_defaults(run=text_to_image)
    rep = tasks.add_parser("report")
    rep.add_argument("--adapter", required=True)
    rep.add_argument("--num_images", type=int, default=200)
    rep.add_argument("--max_new_tokens", type=int, default=64)
    rep.add_argument("--seed", type=int, default=7)
    rep.set_defaults(run=report)
    args = parser.parse_args()
    text = args.run(args)
    print(text)
    header = (f"# The left-out finding ({FINDING}): base vs base + LoRA\n\nMeasured on {platform.machine()}, {os.cpu_count()} CPU cores, "
              "no GPU. See the docstring of benchmarks/left_out_finding.py for the protocol.\n")
    write_section(RESULTS, header, args.task, text)


if __name__ == "__main__":
    main()
