"""DPO for reports: from preference pairs (TRL's JSONL format), raise the policy's log-likelihood margin of the chosen report
over the rejected one relative to the starting policy (Rafailov et al.'s sigmoid loss, TRL's loss_type="sigmoid"); the loop,
checkpoints and adapter folder are the shared ones.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from torch.utils.data import DataLoader

from ..data.preferences import PreferencePairDataset, read_preference_pairs
from ..data.report_batches import ReportCollator, token_logps
from .report import ReportLoRARecipe

logger = get_logger(__name__)


def dpo_sigmoid_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float) -> tuple[torch.Tensor, dict]:
    """-log sigmoid(beta x (chosen log-ratio - rejected log-ratio)), with the implicit rewards for logging. By hand: TRL 1.16 keeps
    this math inside DPOTrainer._compute_loss, not importable."""
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
                  "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
                  "rewards/margin": (chosen_rewards - rejected_rewards).mean().item()}


class PairCollator:
    """Batches of pairs -> one batch of 2n sequences, the n chosen reports first, then the n rejected (ReportCollator's labels)."""

    def __init__(self, collator: ReportCollator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        good = [e for e in examples if "bad_row" not in e]
        as_report = [{**e, "report": e[side]} for side in ("chosen", "rejected") for e in good]
        batch = self.collator(as_report)
        batch["bad_rows"] = [e["bad_row"] for e in examples if "bad_row" in e]
        batch["num_examples"] = len(good)
        return batch


class DPOReportRecipe(ReportLoRARecipe):
    tracker_name = "medfm-report-dpo"
    uses_reference = True
    progress_bar_keys = ("rewards/accuracy",)

    def _setup_data(self) -> None:
        cfg = self.config
        if not cfg.train_data_file:
            raise ValueError("--method dpo reads preference pairs: pass --train_data_file pairs.jsonl (TRL's format: images, prompt, "
                             "chosen, rejected; `medfm pairs` makes them from an adapter's samples)")
        rows = read_preference_pairs(cfg.train_data_file, cfg.image_root)
        if cfg.max_train_samples:
            rows = rows[: cfg.max_train_samples]
        random.Random(cfg.seed).shuffle(rows)
        validation, rows = rows[: cfg.num_validation_samples], rows[cfg.num_validation_samples :]
        max_images = cfg.max_images_per_study if self.family.supports_multiple_images else 1
        self.dataset = PreferencePairDataset(rows, max_images, self.quarantine, cfg.verify_images)
        self.validation_set = PreferencePairDataset(validation, max_images, verify_images=True, as_reference=True) if validation else []
        logger.info(f"{len(self.dataset)} usable preference pairs of {len(rows)} ({len(self.quarantine.rows)} skipped); "
                    f"{len(self.validation_set)} held out for validation (reference: the chosen report)")
        self.collator = ReportCollator(self.processor, self.family, cfg.instruction, cfg.max_length, self.eos_token_id)
        self.train_dataloader = DataLoader(self.dataset, batch_size=cfg.train_batch_size, shuffle=True, collate_fn=PairCollator(self.collator),
                                           num_workers=cfg.dataloader_num_workers, pin_memory=torch.cuda.is_available())
        self.truncated_rows: set[str] = set()

    def training_step(self, batch: dict) -> torch.Tensor:
        inputs = self._model_inputs(batch)
        logps, mask = token_logps(self.model, inputs)
        with torch.no_grad(), self.reference_policy():
            ref_logps, _ = token_logps(self.accelerator.unwrap_model(self.model), inputs)
        sequence, ref_sequence = (logps * mask).sum(-1), (ref_logps * mask).sum(-1)
        loss, logs = dpo_sigmoid_loss(*sequence.chunk(2), *ref_sequence.chunk(2), beta=self.config.beta)
        self.record_step_values(logs)
        return loss
