"""The example accelerate configs in recipes/accelerate/ parse and validate as `accelerate launch --config_file` would read them."""

from pathlib import Path

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


@pytest.mark.parametrize(("name", "engine"), [("multi-gpu-ddp.yaml", "multi_gpu"), ("deepspeed-zero2.yaml", "use_deepspeed"), ("fsdp.yaml", "use_fsdp")])
def test_accelerate_config_parses_as_launch_reads_it(name, engine):
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "recipes/train_lora.py"])
    args, _, _ = _validate_launch_command(args)
    assert getattr(args, engine) and args.num_processes == 2 and args.mixed_precision == "bf16"
    if engine == "use_deepspeed":
        assert args.zero_stage == 2
    if engine == "use_fsdp":
        assert str(args.fsdp_version) == "2" and args.fsdp_auto_wrap_policy == "TRANSFORMER_BASED_WRAP"


def test_every_config_is_documented_in_the_readme():
    readme = (CONFIGS.parents[1] / "README.md").read_text()
    for config in CONFIGS.glob("*.yaml"):
        assert f"recipes/accelerate/{config.name}" in readme
