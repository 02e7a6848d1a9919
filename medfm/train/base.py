"""What every LoRA recipe shares: accelerator, 8-bit AdamW, schedule, resumable checkpoints, the training loop.

A task recipe subclasses `LoRARecipe` torchtune style and fills in `_setup_models`, `_setup_data`,
`training_step`, `validate`, the LoRA save/load of checkpoints and `save_adapter`; the loop stays here,
readable in one sitting.
"""

from __future__ import annotations

import logging
import math
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType, ProjectConfiguration, gather_object, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..config import TrainConfig, save_config
from ..data.pairs import BadRow, Quarantine
from ..hub import EVAL_RESULTS_NAME, create_hub_repo, push_adapter
from ..lora import lora_parameters
from ..models.shipped import recorded_base_name
from ..paths import with_default_mode
from .checkpoints import TrainingProgress, find_checkpoint, prune_checkpoints

logger = get_logger(__name__)
UNSHARDED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)  # every process holds whole parameters


class LoRARecipe:
    tracker_name = "medfm-lora"
    # Multi-process (DDP) runs: whether some trainable parameters may get no gradient in a step (DDP then has to look for them).
    find_unused_parameters = False

    def __init__(self, config: TrainConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.quarantine = Quarantine(strict=config.strict)
        self._validated: tuple[int | None, object] = (None, None)  # (step, result) of the latest validation

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        self._setup_accelerator()
        self._setup_hub()
        self._setup_models()
        self._setup_data()
        self._setup_optimizer()
        self._prepare()
        self._setup_schedule()
        self._setup_checkpointing()

    def _setup_accelerator(self) -> None:
        cfg = self.config
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / cfg.logging_dir)),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=self.find_unused_parameters)],
        )
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        logger.info(self.accelerator.state)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.device.type == "cpu" and self.accelerator.num_processes == 1 and torch.get_num_threads() == 1:
            # `accelerate launch` sets OMP_NUM_THREADS=1 for CPU runs; with a single process that idles the other cores (those this
            # process may run on: `taskset` and cgroup cpusets are respected).
            torch.set_num_threads(len(os.sched_getaffinity(0)))
            logger.info(f"Single CPU process: using {torch.get_num_threads()} threads")
        set_seed(cfg.seed)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)

    def _setup_hub(self) -> None:
        """With --push_to_hub, create the repo now so a missing token or a bad name stops the run before training, not after."""
        cfg = self.config
        if cfg.push_to_hub and self.accelerator.is_main_process:
            cfg.hub_model_id = create_hub_repo(cfg.hub_model_id or self.output_dir.resolve().name, cfg.hub_private)
            logger.info(f"The adapter will be pushed to {cfg.hub_model_id}")

    def _setup_models(self) -> None:
        raise NotImplementedError

    def _setup_data(self) -> None:
        """Set `self.dataset` and `self.train_dataloader` (bad rows go to `self.quarantine`)."""
        raise NotImplementedError

    def trainable_models(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def _setup_optimizer(self) -> None:
        cfg = self.config
        learning_rate = cfg.learning_rate
        if cfg.scale_lr:
            learning_rate *= cfg.gradient_accumulation_steps * cfg.train_batch_size * self.accelerator.num_processes
        optimizer_class = torch.optim.AdamW
        if cfg.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes, or pass --no-use_8bit_adam") from err
            optimizer_class = bnb.optim.AdamW8bit
        # One fused kernel per step instead of a loop over LoRA tensors; sharded engines (DeepSpeed, FSDP) bring their own.
        fused = optimizer_class is torch.optim.AdamW and self.accelerator.distributed_type in UNSHARDED
        self.optimizer = optimizer_class(lora_parameters(*self.trainable_models()), lr=learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                         weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, **({"fused": True} if fused else {}))
        batches_per_process = math.ceil(len(self.train_dataloader) / self.accelerator.num_processes)
        self.max_train_steps = cfg.max_train_steps or cfg.num_train_epochs * math.ceil(batches_per_process / cfg.gradient_accumulation_steps)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps * self.accelerator.num_processes,
                                          num_training_steps=self.max_train_steps * self.accelerator.num_processes)

    def _prepare(self) -> None:
        """Hand the trainable models, optimizer, data and schedule to accelerate (DDP wrapping, device placement)."""
        if self.config.torch_compile:
            for model in self.trainable_models():
                model.compile()  # in place: state-dict keys, hooks and LoRA saving stay as they are
        *models, self.optimizer, self.train_dataloader, self.lr_scheduler = self.accelerator.prepare(
            *self.trainable_models(), self.optimizer, self.train_dataloader, self.lr_scheduler
        )
        self._set_prepared_models(models)
        self.trained_parameters = [p for group in self.optimizer.param_groups for p in group["params"]]  # what the optimizer steps

    def _set_prepared_models(self, models: list[torch.nn.Module]) -> None:
        raise NotImplementedError

    def _setup_schedule(self) -> None:
        self.steps_per_epoch = math.ceil(len(self.train_dataloader) / self.config.gradient_accumulation_steps)
        self.num_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)

    def _setup_checkpointing(self) -> None:
        """Checkpoints hold only LoRA weights (not the frozen base), plus optimizer, scheduler, RNG and progress."""
        self.progress = TrainingProgress()
        self.accelerator.register_for_checkpointing(self.progress)
        self.accelerator.register_save_state_pre_hook(self._save_model_hook)
        self.accelerator.register_load_state_pre_hook(self._load_model_hook)
        if self.config.resume_from_checkpoint:
            path = find_checkpoint(self.output_dir, self.config.resume_from_checkpoint)
            logger.info(f"Resuming from {path}")
            self.accelerator.load_state(str(path))
        if self.accelerator.is_main_process:
            self.accelerator.init_trackers(self.tracker_name, config={k: str(v) for k, v in self.config.to_dict().items()})

    def _save_model_hook(self, models, weights, output_dir):
        if self.accelerator.is_main_process:
            self.save_lora([self.accelerator.unwrap_model(m) for m in models], output_dir)
        weights.clear()  # the frozen base is not saved with every checkpoint

    def _load_model_hook(self, models, input_dir):
        self.load_lora([self.accelerator.unwrap_model(m) for m in models], input_dir)
        models.clear()

    def save_lora(self, models: list[torch.nn.Module], directory: str) -> None:
        raise NotImplementedError

    def load_lora(self, models: list[torch.nn.Module], directory: str) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ train
    def train(self) -> None:
        cfg, accelerator, progress = self.config, self.accelerator, self.progress
        trainable = self.trainable_models()
        logger.info(f"Training {sum(p.numel() for p in self.trained_parameters):,} LoRA parameters for {self.max_train_steps} steps "
                    f"({self.num_epochs} epochs of {self.steps_per_epoch})")
        bar = tqdm(total=self.max_train_steps, initial=progress.global_step, desc="Steps", disable=not accelerator.is_local_main_process)
        if progress.global_step == 0:
            self.validate()
        for epoch in range(progress.epoch, self.num_epochs):
            for model in trainable:
                model.train()
            self.train_dataloader.set_epoch(epoch)
            batches = self.train_dataloader
            if progress.batches_in_epoch:
                batches = accelerator.skip_first_batches(self.train_dataloader, progress.batches_in_epoch)
            for batch in batches:
                progress.batches_in_epoch += 1
                self._record_bad_rows(batch.pop("bad_rows"))
                if not batch.get("num_examples", 1):
                    continue  # every row of this batch was unreadable
                with accelerator.accumulate(*trainable):
                    loss = self.training_step(batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(self.trained_parameters, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                progress.global_step += 1
                bar.update(1)
                step_loss = accelerator.gather(loss.detach()).mean().item()
                step_logs = self.step_logs()
                bar.set_postfix(loss=f"{step_loss:.4f}", **{k: f"{v:.3f}" for k, v in step_logs.items() if k in self.progress_bar_keys})
                accelerator.log({"train_loss": step_loss, "lr": self.lr_scheduler.get_last_lr()[0], **step_logs}, step=progress.global_step)
                if progress.global_step % cfg.checkpointing_steps == 0:
                    self.save_checkpoint()
                if cfg.validation_steps and progress.global_step % cfg.validation_steps == 0:
                    self.validate()
                if progress.global_step >= self.max_train_steps:
                    break
            else:
                progress.epoch, progress.batches_in_epoch = epoch + 1, 0
                if cfg.validation_epochs and progress.epoch % cfg.validation_epochs == 0:
                    self.validate()
                continue
            break
        bar.close()

    def training_step(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    progress_bar_keys: tuple[str, ...] = ()  # step_logs shown next to the loss

    def step_logs(self) -> dict[str, float]:
        """A method's own per-step numbers (rewards, KL, ...), averaged over processes; called on every process once per step."""
        return {}

    def sample_generators(self, indices: torch.Tensor) -> list[torch.Generator]:
        """One generator per example, seeded by (seed, step, example index): every random draw of training (noise,
        timesteps, ...) is then the same however the batch is split over processes, and after a resume."""
        seeds = [np.random.SeedSequence([self.config.seed, self.progress.global_step, int(i)]).generate_state(1, np.uint64)[0] for i in indices]
        return [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def validate(self):
        """Run validation once per step (the final step's result is reused by save_adapter)."""
        step = self.progress.global_step
        if self._validated[0] != step:
            self._validated = (step, self._run_validation())
        return self._validated[1]

    def _run_validation(self):
        raise NotImplementedError

    def _record_bad_rows(self, bad_rows: list[BadRow]) -> None:
        for row in bad_rows:
            self.quarantine.add(row.row_id, row.source, row.reason)

    def gather_bad_rows(self) -> None:
        """Merge the rows every process skipped (main process keeps the union, in first-seen order)."""
        self.quarantine.rows = list({row.row_id: row for row in gather_object(self.quarantine.rows)}.values())

    # ------------------------------------------------------------------------------------------------ outputs
    def save_checkpoint(self) -> None:
        if self.accelerator.is_main_process and self.config.checkpoints_total_limit:
            prune_checkpoints(self.output_dir, self.config.checkpoints_total_limit - 1)
        path = self.output_dir / f"checkpoint-{self.progress.global_step}"
        self.accelerator.save_state(str(path))
        logger.info(f"Saved checkpoint {path}")

    def save_adapter(self) -> Path:
        """The shareable folder: adapter weights, the last validation, bad rows, the resolved config, the model card."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        self.gather_bad_rows()
        if accelerator.is_main_process:
            self._save_adapter_weights()
            validation = self.validate()
            self.quarantine.write(self.output_dir / "bad_rows.jsonl")
            resolved = TrainConfig(**{**self.config.to_dict(), "pretrained_model_name_or_path": self.recorded_base, "resume_from_checkpoint": None})
            save_config(resolved, self.output_dir / "training_config.yaml")
            (self.output_dir / EVAL_RESULTS_NAME).unlink(missing_ok=True)  # evaluations of an earlier adapter in this folder no longer apply
            self._write_model_card(resolved, validation)
            with_default_mode(*(p for p in self.output_dir.iterdir() if p.is_file()))  # weights included (safetensors writes 0600)
            print(f"Adapter saved to {self.output_dir.resolve()} ({len(self.quarantine.rows)} bad rows listed in bad_rows.jsonl)")
            if self.config.push_to_hub:
                print(f"Pushed to {push_adapter(self.output_dir, self.config.hub_model_id, self.config.hub_private)}")
        return self.output_dir

    @cached_property
    def recorded_base(self) -> str:
        """The base as the adapter names it: built-in bases by their (pinned) name, not the folder they were written to here
        (pinning hashes the shipped weights: once per run)."""
        return recorded_base_name(self.config.pretrained_model_name_or_path, self.base)

    def _save_adapter_weights(self) -> None:
        raise NotImplementedError

    def _write_model_card(self, resolved: TrainConfig, validation) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Trackers closed and the process group destroyed once every process is done: a process tearing the group down
        while the main one still validated and wrote the adapter aborted now and then (2-process CPU runs)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
