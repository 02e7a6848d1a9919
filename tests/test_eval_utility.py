"""Task-level evaluation: a classifier trained on real phantoms judges synthetic ones."""

import json

import pytest

from medfm.cli import main as medfm
from medfm.data.phantom import write_phantom_dataset

pytestmark = pytest.mark.slow


def test_conditioning_accuracy_and_downstream_auc(tmp_path, capsys):
    write_phantom_dataset(tmp_path / "real", 120, seed=1, size=64)
    write_phantom_dataset(tmp_path / "synthetic", 60, seed=2, size=64)
    rows = [json.loads(line) for line in (tmp_path / "synthetic" / "metadata.jsonl").read_text().splitlines()]
    # Generated folders carry prompts, not labels: the labeler reads what each prompt asked for.
    (tmp_path / "synthetic" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": r["file_name"], "text": r["impression"]}) + "\n"
                                                                   for r in rows))
    medfm(["eval", "utility", "--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "synthetic"), "--labels", "Cardiomegaly",
           "Pleural Effusion", "--epochs", "6", "--output_dir", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "utility.json").read_text())
    heart = result["conditioning_accuracy"]["Cardiomegaly"]
    assert heart["prompts_asking"] == sum("cardiomegaly" in r["impression"].lower() or "enlarged heart" in r["impression"].lower() for r in rows)
    assert heart["detected_when_asked"] > heart["detected_when_not_asked"] + 0.3
    assert result["auc_real"]["Cardiomegaly"] > 0.8 and set(result["auc_real_plus_synthetic"]) == {"Cardiomegaly", "Pleural Effusion"}
    assert "mean AUC on held-out real" in capsys.readouterr().out
