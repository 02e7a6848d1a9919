"""Two real processes (torchrun, gloo on CPU) train the same adapter as one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medfm.data.phantom import write_phantom_dataset
from medfm.lora import LORA_WEIGHTS_NAME
from recipes.train_lora import main as train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def common(tmp_path) -> list[str]:
    return ["--train_data_dir", str(tmp_path / "data"), "--cache_dir", str(tmp_path / "cache"), "--resolution", "64", "--learning_rate", "1e-3",
            "--checkpointing_steps", "2", "--validation_prompt", "Cardiomegaly.", "--num_validation_images", "1",
            "--validation_inference_steps", "1", "--report_to", "tensorboard"]


def run_two_processes(tmp_path, *flags):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, str(REPO / "recipes" / "train_lora.py"), *common(tmp_path), *flags], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_with_resume_match_one_process_and_only_the_main_one_writes(tmp_path, monkeypatch):
    write_phantom_dataset(tmp_path / "data", num_images=8, seed=4, size=64)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # the one-process reference runs here (no second startup), on the CPU as the two do
    train([*common(tmp_path), "--train_batch_size", "4", "--max_train_steps", "4", "--output_dir", str(tmp_path / "one")])
    first = run_two_processes(tmp_path, "--train_batch_size", "2", "--max_train_steps", "2", "--output_dir", str(tmp_path / "two"))
    assert "MULTI_CPU" in first.stderr and "Num processes: 2" in first.stderr
    resumed = run_two_processes(tmp_path, "--train_batch_size", "2", "--max_train_steps", "4", "--output_dir", str(tmp_path / "two"),
                                "--resume_from_checkpoint", "latest")
    assert "Resuming from" in resumed.stderr

    one, two = load_file(tmp_path / "one" / LORA_WEIGHTS_NAME), load_file(tmp_path / "two" / LORA_WEIGHTS_NAME)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-4, msg=key)  # all-reduced vs one-batch gradient means differ in rounding
    step_two = load_file(tmp_path / "two" / "checkpoint-2" / LORA_WEIGHTS_NAME)
    assert any(not torch.equal(step_two[k], two[k]) for k in two)  # the resumed steps changed the adapter

    assert resumed.stdout.count("Adapter saved to") == 1
    writers = {path.name.split(".")[-2] for path in (tmp_path / "two" / "logs").rglob("events.out.tfevents.*")}
    assert len(writers) == 2  # one TensorBoard writer per launch (two launches of two processes each)
