"""`medfm`: a thin command line over the library."""

from __future__ import annotations

import argparse
import sys


def _phantom(args) -> None:
    from .data.phantom import write_phantom_dataset

    folder = write_phantom_dataset(args.output_dir, args.num_images, args.seed, args.size)
    print(f"Wrote {args.num_images} phantoms to {folder} (metadata.jsonl: file_name, text, findings, impression, 14 CheXpert labels)")


def _generate(args) -> None:
    from .generate import generate_images

    paths = generate_images(args.prompt, args.output_dir, adapter=args.adapter, pretrained_model_name_or_path=args.pretrained_model_name_or_path,
                            num_images=args.num_images, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                            negative_prompt=args.negative_prompt, seed=args.seed)
    print(f"Wrote {len(paths)} images to {args.output_dir}")


def _train(argv: list[str]) -> None:
    from .config import parse_train_config
    from .train import recipe_for

    recipe = recipe_for(parse_train_config(argv))
    recipe.setup()
    recipe.train()
    recipe.save_adapter()
    recipe.cleanup()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfm", description="LoRA-adapt foundation models to radiology image–report pairs.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="Train a LoRA adapter (same flags as recipes/train_lora.py).", add_help=False)
    train.set_defaults(run=None)

    phantom = commands.add_parser("phantom", help="Write digital chest-radiograph phantoms as an imagefolder dataset.")
    phantom.add_argument("--output_dir", required=True)
    phantom.add_argument("--num_images", type=int, default=100)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--size", type=int, default=256, help="Image side in px.")
    phantom.set_defaults(run=_phantom)

    generate = commands.add_parser("generate", help="Generate radiographs from prompts with a text-to-image adapter.")
    generate.add_argument("--adapter", help="Adapter folder written by training.")
    generate.add_argument("--pretrained_model_name_or_path", help="Base model (default: the one in the adapter's training_config.yaml).")
    generate.add_argument("--prompt", action="append", required=True, help="Report text; repeat for several prompts.")
    generate.add_argument("--negative_prompt")
    generate.add_argument("--num_images", type=int, default=1, help="Images per prompt.")
    generate.add_argument("--num_inference_steps", type=int, default=25)
    generate.add_argument("--guidance_scale", type=float, default=7.5)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--output_dir", default="medfm-generated")
    generate.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return _train(argv[1:])
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
