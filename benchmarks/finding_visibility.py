"""Which phantom findings can the tiny LLaVA's image encoder see, and how fast can an encoder learn them?

Two measurements on the same phantoms, as the tiny LLaVA's processor gives them (256 px drawn, 64 px model input):
- probe: a logistic-regression probe (scikit-learn) on an adapter's (or the base's) projected image tokens: is the finding
  in the features the language model reads?
- learn: an image encoder trained directly on the findings' presence (binary cross-entropy), then ROC AUC on held-out
  phantoms, at the end or every `--eval_every` steps (a learning curve: pneumothorax and nodules are learned late, so one
  short run can mislead). Arms: the base's pretrained vision tower + projector; the same ViT from scratch with 8-px and
  4-px patches; a small CNN (5 convolutions) with global max pooling, and the same CNN with the ViT arms' per-finding
  attention pooling (so that encoder, not read-out, is what differs).

    python benchmarks/finding_visibility.py probe --adapter adapters/phantom-report
    python benchmarks/finding_visibility.py learn --steps 1500 --eval_every 250 --arms "8-px" CNN   # about 20 minutes on one core
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


def small_cnn(findings: int, width: int = 32) -> nn.Sequential:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.GELU()]

    return nn.Sequential(*block(3, width), *block(width, width), nn.MaxPool2d(2), *block(width, 2 * width), *block(2 * width, 2 * width),
                         nn.MaxPool2d(2), *block(2 * width, 4 * width), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4 * width, findings))


def encoder_arms(model) -> dict:
    """Each arm: a builder of (trainable modules, pixels -> finding logits); built only when the arm is run."""
    findings = len(FINDINGS)

    def pretrained_tower():
        heads = FindingHeads(model.config.text_config.hidden_size, findings)
        return nn.ModuleList([model.model.vision_tower, model.model.multi_modal_projector, heads]), lambda x: heads(image_tokens(model, x))

    def vit_from_scratch(patch_size: int):
        vit = CLIPVisionModel(CLIPVisionConfig(**{**model.config.vision_config.to_dict(), "patch_size": patch_size}))
        heads = FindingHeads(vit.config.hidden_size, findings)
        return nn.ModuleList([vit, heads]), lambda x: heads(vit(pixel_values=x).last_hidden_state[:, 1:])

    def cnn_attention_pooling():
        features = small_cnn(findings)[:-3]  # the convolutions; their 16x16 map becomes 256 tokens
        heads = FindingHeads(features[-2].out_channels, findings)
        return nn.ModuleList([features, heads]), lambda x: heads(features(x).flatten(2).transpose(1, 2))

    def cnn():
        network = small_cnn(findings)
        return network, network

    return {"tiny LLaVA vision tower + projector (pretrained)": pretrained_tower,
            "the same ViT, 8-px patches (from scratch)": lambda: vit_from_scratch(8),
            "the same ViT with 4-px patches (from scratch)": lambda: vit_from_scratch(4),
            "small CNN (5 convolutions, from scratch), global max pooling": cnn,
            "small CNN, attention pooling as the ViT arms": cnn_attention_pooling}


def learn(args) -> None:
    model, processor, _ = load_report_model(None, pretrained_model_name_or_path=BUILTIN_TINY_VLM, device="cpu")
    pixels, labels = phantom_inputs(processor, args.num_train + args.num_test)
    arms = {name: build for name, build in encoder_arms(model).items() if not args.arms or any(word in name for word in args.arms)}
    checkpoints = {*range(args.eval_every, args.steps, args.eval_every), args.steps} if args.eval_every else {args.steps}
    print(f"batch 32, AdamW lr 1e-3, {args.num_train} training / {args.num_test} held-out phantoms, 64 px input")
    print("| encoder | steps | " + " | ".join(FINDINGS) + " | minutes |\n|---|---|" + "---|" * (len(FINDINGS) + 1), flush=True)
    for arm, build in arms.items():
        torch.manual_seed(args.seed)
        parameters, score = build()
        optimizer = torch.optim.AdamW(parameters.parameters(), lr=1e-3, weight_decay=1e-2)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            index = torch.randint(args.num_train, (32,))
            loss = F.binary_cross_entropy_with_logits(score(pixels[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step in checkpoints:
                with torch.no_grad():
                    scores = torch.cat([score(pixels[i:i + 200]) for i in range(args.num_train, len(pixels), 200)])
                aucs = [roc_auc_score(labels[args.num_train:, k], scores[:, k]) for k in range(len(FINDINGS))]
                print(f"| {arm} | {step} | " + " | ".join(f"{auc:.3f}" for auc in aucs) + f" | {(time.perf_counter() - start) / 60:.1f} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["probe", "learn"])
    parser.add_argument("--adapter", help="probe: a report adapter folder (default: the built-in base alone)")
    parser.add_argument("--num_train", type=int, default=4000)
    parser.add_argument("--num_test", type=int, default=600)
    parser.add_argument("--steps", type=int, default=1500, help="learn: training steps per encoder")
    parser.add_argument("--eval_every", type=int, default=0, help="learn: also measure every N steps (a learning curve); 0: at the end only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="*", help="learn: only the encoders whose label contains one of these words (e.g. CNN)")
    args = parser.parse_args(argv)
    {"probe": probe, "learn": learn}[args.mode](args)


if __name__ == "__main__":
    main()
