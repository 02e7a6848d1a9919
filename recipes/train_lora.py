"""LoRA-adapt a foundation model on radiology image–report pairs.

    accelerate launch recipes/train_lora.py                                   # embedded offline default
    accelerate launch recipes/train_lora.py --config recipes/configs/sd15-mimic-cxr.yaml
    accelerate launch recipes/train_lora.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir /data/mimic-cxr-pairs --output_dir roentgen-lora

With no arguments it trains a tiny built-in base on built-in chest-radiograph phantoms: no network, no GPU.
Flags override the YAML given with --config; `--help` lists every key.
"""

from medfm.config import parse_train_config
from medfm.train import recipe_for


def main(argv=None):
    config = parse_train_config(argv)  # defaults < --config YAML < flags, validated before any work
    recipe = recipe_for(config)
    recipe.setup()  # accelerator, base model + LoRA, data, 8-bit AdamW, resume
    recipe.train()  # the loop: denoising loss, checkpoints, validation grids
    recipe.save_adapter()  # pytorch_lora_weights.safetensors, README.md, training_config.yaml
    recipe.cleanup()


if __name__ == "__main__":
    main()
