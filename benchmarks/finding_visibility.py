"""Which phantom findings can the tiny LLaVA's image encoder see? Why GRPO cannot raise pneumothorax/nodule recall there.

Two measurements on the same phantoms, as the tiny LLaVA's processor gives them (256 px drawn, 64 px model input):
- probe: a logistic-regression probe (scikit-learn) on an adapter's (or the base's) projected image tokens: is the finding
  in the features the language model reads?
- learn: an image encoder trained directly on the findings' presence (binary cross-entropy, attention pooling per finding),
  then ROC AUC on held-out phantoms: can this encoder learn the finding at all? Arms: the base's pretrained vision tower +
  projector, the same ViT with 4-px patches (from scratch), and a small CNN (5 convolutions) on the same 64 px input: if the
  CNN learns a finding the tower does not, the input shows it and the tower's architecture is the limit.

    python benchmarks/finding_visibility.py probe --adapter adapters/phantom-report
    python benchmarks/finding_visibility.py learn --steps 1500      # about 30 minutes on one CPU core (--arms CNN: one encoder)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from medfm.config import BUILTIN_TINY_VLM
from medfm.data.phantom import make_phantom, sample_case
from medfm.data.studies import to_pil_rgb
from medfm.generate import load_report_model

FINDINGS = ("pneumothorax", "nodule", "effusion", "consolidation", "cardiomegaly")
SEED_OFFSET = 555_000  # phantom seeds apart from training (seed 0 family) and held-out evaluation (seed 7 family) sets


def phantom_inputs(processor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values as the model's processor makes them, (count, findings) presence) for `count` phantoms."""
    seeds = [SEED_OFFSET + i for i in range(count)]
    pixels = torch.cat([processor.image_processor([to_pil_rgb(make_phantom(s, 256)[0]) for s in seeds[i:i + 200]], return_tensors="pt")["pixel_values"]
                        for i in range(0, count, 200)])
    labels = torch.tensor([[float(bool(getattr(sample_case(s), name))) for name in FINDINGS] for s in seeds])
    return pixels, labels


def image_tokens(model, pixels: torch.Tensor) -> torch.Tensor:
    """(B, tokens, hidden): the projected image tokens the language model reads."""
    return torch.stack(list(model.get_image_features(pixel_values=pixels).pooler_output))


def probe(args) -> None:
    model, processor, _ = load_report_model(args.adapter, pretrained_model_name_or_path=None if args.adapter else BUILTIN_TINY_VLM, device="cpu")
    pixels, labels = phantom_inputs(processor, args.num_train + args.num_test)
    with torch.no_grad():
        features = torch.cat([image_tokens(model, pixels[i:i + 100]) for i in range(0, len(pixels), 100)]).flatten(1).numpy()
    train, test = slice(0, args.num_train), slice(args.num_train, None)
    print(f"| finding | probe ROC AUC on {args.num_test} held-out phantoms | positives |\n|---|---|---|")
    for k, name in enumerate(FINDINGS):
        y = labels[:, k].numpy()
        classifier = LogisticRegression(C=0.1, max_iter=2000).fit(features[train], y[train])
        print(f"| {name} | {roc_auc_score(y[test], classifier.predict_proba(features[test])[:, 1]):.3f} | {int(y[test].sum())} |")


class FindingHeads(nn.Module):
    """Per-finding attention pooling over an encoder's tokens, then a linear score."""

    def __init__(self, hidden: int, findings: int):
        super().__init__()
        self.attention, self.score = nn.Linear(hidden, findings), nn.Linear(hidden, findings)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = torch.einsum("btk,btd->bkd", self.attention(tokens).softmax(1), tokens)
        return (pooled * self.score.weight).sum(-1) + self.score.bias


def small_cnn(findings: int, width: int = 32) -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.GELU()]

    return nn.Sequential(*block(3, width), *block(width, width), nn.MaxPool2d(2), *block(width, 2 * width), *block(2 * width, 2 * width),
                         nn.MaxPool2d(2), *block(2 * width, 4 * width), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4 * width, findings))


def learn(args) -> None:
    model, processor, _ = load_report_model(None, pretrained_model_name_or_path=BUILTIN_TINY_VLM, device="cpu")
    pixels, labels = phantom_inputs(processor, args.num_train + args.num_test)
    heads = FindingHeads(model.config.text_config.hidden_size, len(FINDINGS))
    tower = nn.ModuleList([model.model.vision_tower, model.model.multi_modal_projector, heads])
    fine_vit = CLIPVisionModel(CLIPVisionConfig(**{**model.config.vision_config.to_dict(), "patch_size": 4}))  # same ViT, 4x the tokens
    fine_heads = FindingHeads(fine_vit.config.hidden_size, len(FINDINGS))
    arms = {"tiny LLaVA vision tower + projector (pretrained)": (tower, lambda x: heads(image_tokens(model, x))),
            "the same ViT with 4-px patches (from scratch)": (nn.ModuleList([fine_vit, fine_heads]),
                                                              lambda x: fine_heads(fine_vit(pixel_values=x).last_hidden_state[:, 1:])),
            "small CNN (5 convolutions, from scratch)": (cnn := small_cnn(len(FINDINGS)), cnn)}
    arms = {name: arm for name, arm in arms.items() if not args.arms or any(word in name for word in args.arms)}
    rows = []
    for arm, (parameters, score) in arms.items():
        torch.manual_seed(args.seed)
        optimizer = torch.optim.AdamW(parameters.parameters(), lr=1e-3, weight_decay=1e-2)
        start = time.perf_counter()
        for _ in range(args.steps):
            index = torch.randint(args.num_train, (32,))
            loss = F.binary_cross_entropy_with_logits(score(pixels[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            scores = torch.cat([score(pixels[i:i + 200]) for i in range(args.num_train, len(pixels), 200)])
        aucs = [roc_auc_score(labels[args.num_train:, k], scores[:, k]) for k in range(len(FINDINGS))]
        rows.append(f"| {arm} | " + " | ".join(f"{auc:.3f}" for auc in aucs) + f" | {(time.perf_counter() - start) / 60:.1f} |")
    print(f"{args.steps} steps, batch 32, {args.num_train} training / {args.num_test} held-out phantoms, 64 px input")
    print("| encoder | " + " | ".join(FINDINGS) + " | minutes |\n|---|" + "---|" * (len(FINDINGS) + 1))
    print("\n".join(rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["probe", "learn"])
    parser.add_argument("--adapter", help="probe: a report adapter folder (default: the built-in base alone)")
    parser.add_argument("--num_train", type=int, default=4000)
    parser.add_argument("--num_test", type=int, default=600)
    parser.add_argument("--steps", type=int, default=1500, help="learn: training steps per encoder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="*", help="learn: only the encoders whose label contains one of these words (e.g. CNN)")
    args = parser.parse_args(argv)
    {"probe": probe, "learn": learn}[args.mode](args)


if __name__ == "__main__":
    main()
