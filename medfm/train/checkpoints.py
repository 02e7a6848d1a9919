"""Resumable checkpoints: where training stands, and which checkpoint folders exist."""

from __future__ import annotations

import shutil
from pathlib import Path


class TrainingProgress:
    """Step, epoch and position inside the epoch: saved with every checkpoint (random draws are seeded from the step)."""

    def __init__(self):
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.global_step, self.epoch, self.batches_in_epoch = state["global_step"], state["epoch"], state["batches_in_epoch"]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def find_checkpoint(output_dir: str | Path, which: str) -> Path:
    """`which` is "latest" (newest in output_dir) or a checkpoint folder."""
    if which == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint-N folder in {output_dir}")
        return checkpoints[-1]
    path = Path(which)
    if not path.is_dir():
        path = Path(output_dir) / which
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {which}: no such checkpoint folder (looked in . and {output_dir})")
    return path


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete the oldest checkpoints so that at most `keep` remain."""
    checkpoints = list_checkpoints(output_dir)
    for old in checkpoints[: max(len(checkpoints) - keep, 0)]:
        shutil.rmtree(old)
