"""GRPO and DPO for reports on the tiny built-in LLaVA: resume equivalence, the reference policy, preference pairs, the adapter folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medfm.cli import main as medfm
from medfm.data.phantom import builtin_phantom_dir
from recipes.train_lora import main as train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
SFT_ADAPTER = REPO / "adapters" / "phantom-report"
INSTRUCTION = "Write the impression of the radiology report for this chest X-ray."
COMMON = ["--task", "report", "--pretrained_model_name_or_path", "builtin:tiny-llava", "--report_section", "impression", "--instruction", INSTRUCTION,
          "--max_length", "256", "--train_batch_size", "2", "--num_validation_samples", "0", "--learning_rate", "1e-3", "--lr_scheduler", "constant",
          "--checkpointing_steps", "5", "--report_to", "none"]
GRPO = ["--method", "grpo", "--phantom_num_images", "16", "--num_generations", "2", "--max_new_tokens", "8", "--beta", "0.1"]


def weights(adapter: Path) -> dict:
    return load_file(adapter / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-6, msg=name)


def log(adapter: Path) -> list[dict]:
    return [json.loads(line) for line in (adapter / "train_log.jsonl").read_text().splitlines()]


def test_grpo_from_an_sft_adapter_resumes_exactly_and_its_reference_is_that_adapter(tmp_path):
    args = [*COMMON, *GRPO, "--scale_rewards", "batch", "--init_adapter", str(SFT_ADAPTER)]  # the demo recipe's scaling
    train([*args, "--max_train_steps", "10", "--output_dir", str(tmp_path / "straight")])
    train([*args, "--max_train_steps", "5", "--output_dir", str(tmp_path / "resumed")])
    train([*args, "--max_train_steps", "10", "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"])
    assert_same_adapter(tmp_path / "straight", tmp_path / "resumed")
    straight, resumed = log(tmp_path / "straight"), log(tmp_path / "resumed")
    assert len(straight) == len(resumed) == 10
    for a, b in zip(straight, resumed):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)  # the same samples, rewards, KL

    steps = log(tmp_path / "straight")
    assert {"reward", "rewards/clinical_micro", "rewards/length", "rewards/rougel", "kl", "completion_words", "frac_groups_equal_reward"} <= set(steps[0])
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first samples come from the reference itself: the SFT adapter, not the base
    assert max(step["kl"] for step in steps) > 0  # then the policy moves away from it
    trained, started = weights(tmp_path / "straight"), weights(SFT_ADAPTER)
    assert trained.keys() == started.keys() and any(not torch.equal(trained[k], started[k]) for k in trained)

    out = tmp_path / "straight"
    config = yaml.safe_load((out / "training_config.yaml").read_text())
    assert config["method"] == "grpo" and config["init_adapter"] == str(SFT_ADAPTER) and config["num_generations"] == 2
    assert config["reward"] == {"clinical_micro": 1.0, "length": 0.2, "rougel": 0.3} and config["scale_rewards"] == "batch"
    card = (out / "README.md").read_text()
    assert "**GRPO**" in card and "1 x `clinical_micro` + 0.2 x `length` + 0.3 x `rougel`" in card and str(SFT_ADAPTER) in card
    assert "divided by the batch's reward std" in card
    assert "- grpo" in card  # a Hub tag
    assert not (out / "reference").exists() and not (out / "checkpoint-5" / "reference").exists()  # only the trained adapter is saved
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"].startswith("builtin:tiny-llava@")


def pairs_file(tmp_path: Path) -> Path:
    """Hand-written pairs in TRL's format: the phantom's own impression is chosen, another phantom's rejected; one bad row."""
    folder = builtin_phantom_dir(16)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    others = [rows[(i + 5) % len(rows)]["impression"] for i in range(len(rows))]
    pairs = [{"images": [str(folder / row["file_name"])], "prompt": INSTRUCTION, "chosen": row["impression"], "rejected": other}
             for row, other in zip(rows, others) if row["impression"] != other]
    pairs.append({"images": ["missing.png"], "prompt": INSTRUCTION, "chosen": "Enlarged heart.", "rejected": "No acute process."})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def test_dpo_from_the_base_resumes_exactly_and_quarantines_bad_pairs(tmp_path):
    args = [*COMMON, "--method", "dpo", "--train_data_file", str(pairs_file(tmp_path)), "--beta", "0.5"]
    train([*args, "--max_train_steps", "10", "--output_dir", str(tmp_path / "straight")])
    train([*args, "--max_train_steps", "5", "--output_dir", str(tmp_path / "resumed")])
    train([*args, "--max_train_steps", "10", "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"])
    assert_same_adapter(tmp_path / "straight", tmp_path / "resumed")
    steps = log(tmp_path / "straight")
    assert steps[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)  # the reference is the base: the fresh LoRA starts as it
    bad = [json.loads(line) for line in (tmp_path / "straight" / "bad_rows.jsonl").read_text().splitlines()]
    assert len(bad) == 1 and "missing.png" in json.dumps(bad[0])
    assert "**DPO**" in (tmp_path / "straight" / "README.md").read_text()


def test_medfm_pairs_writes_trl_preference_pairs_that_dpo_reads(tmp_path, capsys):
    output = tmp_path / "pairs.jsonl"
    medfm(["pairs", "--adapter", str(SFT_ADAPTER), "--output", str(output), "--phantom_num_images", "8", "--num_samples", "3",
           "--max_new_tokens", "12", "--margin", "0.01", "--reward", "clinical=1", "length=0.5"])
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert rows and "Wrote" in capsys.readouterr().out
    for row in rows:
        assert {"images", "prompt", "chosen", "rejected"} <= set(row) and Path(row["images"][0]).is_file()
        assert row["chosen_reward"] - row["rejected_reward"] >= 0.01 and row["chosen"] != row["rejected"]
    train([*COMMON, "--method", "dpo", "--train_data_file", str(output), "--max_train_steps", "2", "--output_dir", str(tmp_path / "dpo"),
           "--init_adapter", str(SFT_ADAPTER)])
    assert log(tmp_path / "dpo")[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-4)  # the reference is the SFT adapter it starts from


def test_an_init_adapter_trained_on_another_base_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="pass --pretrained_model_name_or_path builtin:tiny-llava@"):
        train([*COMMON, *GRPO, "--pretrained_model_name_or_path", "builtin:tiny-qwen2-vl", "--init_adapter", str(SFT_ADAPTER),
               "--max_train_steps", "1", "--output_dir", str(tmp_path / "out")])


def test_grpo_from_an_sft_adapter_trains_on_two_processes(tmp_path):
    """Each process samples and scores its own studies (the batch's reward std gathered from both); DDP must accept the fully
    trained vision tower whose last layer the LLaVA features skip (vision_feature_layer=-2), which stopped multi-process
    report training before."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "recipes" / "train_lora.py"), *COMMON, *GRPO,
               "--init_adapter", str(SFT_ADAPTER), "--scale_rewards", "batch", "--max_train_steps", "2", "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Num processes: 2" in result.stderr
    assert len(log(tmp_path / "out")) == 2 and any(not torch.equal(a, b) for a, b in zip(weights(tmp_path / "out").values(), weights(SFT_ADAPTER).values()))
