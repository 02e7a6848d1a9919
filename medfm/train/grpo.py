"""GRPO for reports: sample `num_generations` reports per study, score them with `medfm.rewards`, and push the policy towards
the reports that beat their group's mean, with a KL penalty to the starting policy (DeepSeekMath's GRPO, as TRL's
GRPOTrainer computes it with loss_type="grpo"; the loop, checkpoints and adapter folder are the shared ones).
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate.logging import get_logger

from ..config import SCALE_REWARDS
from ..data.report_batches import IGNORE_INDEX, PromptCollator, encode_prompts, token_logps
from ..rewards import Reward
from .report import ReportLoRARecipe

logger = get_logger(__name__)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", batch_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """Each reward minus its group's mean (rewards ordered group by group), divided by the group's std ("group", TRL's default),
    by the std of the whole batch (`batch_rewards`, e.g. gathered from every process; "batch", TRL's option after Lite PPO: a
    group whose reports differ only a little keeps a small advantage), or not at all ("none", Dr. GRPO). Inline in TRL's trainer."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / ((grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])) + 1e-4)
    elif scale == "batch":
        spread = rewards if batch_rewards is None else batch_rewards
        centred = centred / ((spread.std().item() if spread.numel() > 1 else 0.0) + 1e-4)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale!r}")
    return centred.view(-1)


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including each row's first end token, 0 after it (generate pads finished rows)."""
    is_end = completion_ids == eos_token_id
    first_end = torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1), completion_ids.shape[1])
    return (torch.arange(completion_ids.shape[1], device=completion_ids.device)[None] <= first_end[:, None]).long()


def clipped_grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None, advantages: torch.Tensor,
                      mask: torch.Tensor, epsilon: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's loss_type="grpo": per-token clipped ratio times advantage plus beta x the k3 KL estimate, averaged per sequence then
    over sequences; returns (loss, mean KL). By hand: TRL 1.16 keeps this math inside GRPOTrainer._compute_loss, not importable."""
    ratio = torch.exp(logps - old_logps)
    advantages = advantages[:, None]
    per_token = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages)
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
    mask = mask.float()
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    return loss, (kl * mask).sum() / mask.sum().clamp(min=1)


class GRPOReportRecipe(ReportLoRARecipe):
    tracker_name = "medfm-report-grpo"
    uses_reference = True
    progress_bar_keys = ("reward", "kl")

    def _setup_data(self) -> None:
        super()._setup_data()
        self.reward = Reward(self.config.reward)
        logger.info(f"GRPO: {self.config.num_generations} reports per study, reward = {self.reward.describe()}, beta {self.config.beta}")

    def train_collator(self):
        return PromptCollator(self.config.instruction)

    # ------------------------------------------------------------------------------------------------ sampling
    def _sampling_seed(self) -> int:
        """Seeded by (seed, epoch, batch in epoch, process): the same draws after a resume, different ones on each process."""
        progress = self.progress
        key = [self.config.seed, progress.epoch, progress.batches_in_epoch, self.accelerator.process_index]
        return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] % (2**63))

    @torch.no_grad()
    def sample(self, inputs: dict) -> torch.Tensor:
        """Completion token ids, one row per prompt row of `inputs` (each study's prompt is repeated num_generations times)."""
        cfg = self.config
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.accelerator.autocast():
            torch.manual_seed(self._sampling_seed())
            output = model.generate(**inputs, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                    max_new_tokens=cfg.max_new_tokens, pad_token_id=self.collator.pad_token_id)
        model.train()
        return output[:, inputs["input_ids"].shape[1] :]

    # ------------------------------------------------------------------------------------------------ train
    def training_step(self, batch: dict) -> torch.Tensor:
        cfg, group = self.config, self.config.num_generations
        images = [study for study in batch["images"] for _ in range(group)]
        references = [reference for reference in batch["references"] for _ in range(group)]
        prompts = self._model_inputs(encode_prompts(self.processor, self.family, [text for text in batch["instructions"] for _ in range(group)], images))
        completion_ids = self.sample(prompts)
        mask = completion_mask(completion_ids, self.eos_token_id)
        completions = [text.strip() for text in self.processor.batch_decode(completion_ids * mask + self.collator.pad_token_id * (1 - mask),
                                                                          skip_special_tokens=True)]
        scores = self.reward(completions, references, images)
        rewards = torch.tensor(scores.total, dtype=torch.float32)
        batch_rewards = self.accelerator.gather(rewards.to(self.accelerator.device)) if cfg.scale_rewards == "batch" else None
        advantages = group_advantages(rewards, group, cfg.scale_rewards, batch_rewards).to(self.accelerator.device)

        inputs = self._sequences(prompts, completion_ids, mask)
        logps, label_mask = token_logps(self.model, inputs)
        with torch.no_grad(), self.reference_policy():
            ref_logps = token_logps(self.accelerator.unwrap_model(self.model), inputs)[0] if cfg.beta else None
        # One policy update per sampled batch: the old policy is the current one (TRL's shortcut for num_iterations=1).
        loss, kl = clipped_grpo_loss(logps, logps.detach(), ref_logps, advantages, label_mask, cfg.epsilon, cfg.beta)

        grouped = rewards.view(-1, group)
        self.record_step_values({
            "reward": rewards.mean().item(), "reward_std": grouped.std(dim=1).mean().item() if group > 1 else 0.0,
            **{f"rewards/{name}": float(np.mean(values)) for name, values in scores.terms.items()},
            "completion_words": float(np.mean([len(c.split()) for c in completions])),
            "reference_words": float(np.mean([len(r.split()) for r in references])),
            "completion_tokens": mask.sum(1).float().mean().item(), "kl": kl.item(),
            "frac_groups_equal_reward": (grouped.max(dim=1).values == grouped.min(dim=1).values).float().mean().item(),
        })
        return loss

    def _sequences(self, prompts: dict, completion_ids: torch.Tensor, mask: torch.Tensor) -> dict:
        """Prompt + completion as one batch, labels on the completion tokens (through the first end token) only."""
        sequence_keys = [k for k, v in prompts.items() if torch.is_tensor(v) and v.shape[:2] == prompts["input_ids"].shape]
        inputs = dict(prompts)
        for key in sequence_keys:
            if key == "input_ids":
                fill = completion_ids
            elif key == "attention_mask":
                fill = mask
            else:
                fill = torch.full_like(completion_ids, self.family.report_token_type_id if key == "token_type_ids" else 0)
            inputs[key] = torch.cat([prompts[key], fill.to(prompts[key].dtype)], dim=1)
        labels = completion_ids.masked_fill(mask == 0, IGNORE_INDEX)
        inputs["labels"] = torch.cat([torch.full_like(prompts["input_ids"], IGNORE_INDEX), labels], dim=1)
        return inputs
