"""The speed benchmark runs end to end (tiny and short: what it measures here is not a result)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_throughput_runs_both_arms_and_writes_their_table(tmp_path):
    results, raw = tmp_path / "RESULTS.md", tmp_path / "runs.json"
    subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--max_train_steps", "2", "--num_images", "4", "--train_batch_size", "2",
                    "--resolution", "64", "--repeats", "1", "--arms", "medfm", "--results", str(results), "--json", str(raw)],
                   cwd=REPO, check=True, capture_output=True)
    runs = json.loads(raw.read_text())["runs"]
    assert sorted(runs) == ["medfm", "reference"]
    for (run,) in runs.values():  # 2 steps: the fewest that give a rate (samples/s counts the steps after the first)
        assert run["steps"] == 2 and run["samples_per_s"] > 0 and run["whole_run_s"] >= run["time_to_first_step_s"] > 0
        assert len(run["losses"]) == 2 and all(math.isfinite(loss) for loss in run["losses"])
    table = results.read_text()
    assert "Reproduce: `python benchmarks/train_throughput.py" in table and "| samples/s vs reference | **1.00x** |" in table


@pytest.mark.slow
def test_report_throughput_arms_train_alike(tmp_path):
    results = tmp_path / "RESULTS.md"
    subprocess.run([sys.executable, "benchmarks/report_throughput.py", "--max_train_steps", "2", "--repeats", "1", "--results", str(results),
                    "--phantom_num_images", "16", "--train_batch_size", "2", "--lr_scheduler", "constant"], cwd=REPO, check=True, capture_output=True)
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in results.read_text().splitlines()
            if line.startswith("| ")}
    reference_loss, medfm_loss = map(float, rows["loss at the last step"])
    assert reference_loss == pytest.approx(medfm_loss, abs=2e-4)  # same training: only where the logits are computed differs
    assert all(float(value) > 0 for value in rows["samples/s"])


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MEDFM_DIFFUSERS_REPO"), reason="needs a diffusers checkout (git dir or work tree) in MEDFM_DIFFUSERS_REPO")
def test_sana_throughput_runs_medfm_against_the_diffusers_script(tmp_path):
    results, raw = tmp_path / "RESULTS.md", tmp_path / "runs.json"
    subprocess.run([sys.executable, "benchmarks/sana_throughput.py", "--diffusers_repo", os.environ["MEDFM_DIFFUSERS_REPO"], "--max_train_steps", "3",
                    "--warmup_steps", "1", "--num_images", "8", "--repeats", "1", "--results", str(results), "--json", str(raw)],
                   cwd=REPO, check=True, capture_output=True)
    runs = json.loads(raw.read_text())["runs"]
    assert sorted(runs) == ["diffusers", "medfm"]
    for (run,) in runs.values():
        assert run["steps"] == 3 and run["steps_per_s"] > 0 and run["whole_run_s"] > run["time_to_first_step_s"] > 0
        assert len(run["losses"]) == 3 and all(math.isfinite(loss) for loss in run["losses"])
    assert "| steps/s vs diffusers | **1.00x** |" in results.read_text()


@pytest.mark.slow
def test_alignment_benchmark_trains_and_evaluates_its_arms(tmp_path):
    results = tmp_path / "RESULTS-alignment.md"
    subprocess.run([sys.executable, "benchmarks/alignment.py", "--smoke", "--arms", "sft", "grpo", "--seeds", "0", "--runs", str(tmp_path / "runs"),
                    "--num_images", "2", "--max_new_tokens", "4", "--results", str(results)], cwd=REPO, check=True, capture_output=True)
    text = results.read_text()
    assert "Reproduce: `python benchmarks/alignment.py --smoke" in text and "GRPO targets:" in text
    rows = [line for line in text.splitlines() if line.startswith(("| sft | 0 |", "| grpo | 0 |"))]
    assert len(rows) == 2 and (tmp_path / "runs" / "grpo-seed0" / "adapter_model.safetensors").is_file()


def test_results_sections_are_replaced_in_place_and_new_ones_go_last(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from results import write_section

    path = tmp_path / "RESULTS.md"
    path.write_text("# Title\n\n## zeta\n\nold zeta\n\n## alpha\n\nhand-written notes\n")
    write_section(path, "# Title", "zeta", "new zeta")
    write_section(path, "# Title", "beta", "beta body")
    text = path.read_text()
    assert [line for line in text.splitlines() if line.startswith("## ")] == ["## zeta", "## alpha", "## beta"]
    assert "new zeta" in text and "old zeta" not in text and "hand-written notes" in text
