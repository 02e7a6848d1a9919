"""LoRA-adapt a vision-language model to write radiology reports from radiographs (LLaVA-Rad's recipe, made cheap)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import AutoProcessor

from ..config import TrainConfig
from ..data.report_batches import ReportCollator, end_token_id, full_instruction, report_token_loss, trl_utils
from ..data.studies import ReportStudyDataset, load_studies
from ..eval.report_metrics import quick_report_metrics
from ..generate import generate_reports
from ..hub import resolve_adapter, write_report_card
from ..models.vlm import load_vlm, resolve_vlm
from .base import LoRARecipe

logger = get_logger(__name__)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
REFERENCE_ADAPTER = "reference"  # the frozen copy of --init_adapter that grpo and dpo compare the policy with


class ReportLoRARecipe(LoRARecipe):
    tracker_name = "medfm-report-lora"
    # A vision tower trained whole (modules_to_save) has layers after the one whose features the VLM reads (LLaVA's
    # vision_feature_layer=-2): they get no gradient, which DDP rejects unless told to look for unused parameters.
    find_unused_parameters = True

    def _setup_models(self) -> None:
        cfg = self.config
        with self.accelerator.main_process_first():
            self.base = resolve_vlm(cfg.pretrained_model_name_or_path)
        model, self.processor, self.family = load_vlm(self.base, cfg.revision, torch_dtype=self.weight_dtype, load_in_4bit=cfg.load_in_4bit)
        if cfg.load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        elif cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        target = cfg.target_modules or self.family.language_model_pattern
        if cfg.lora_on_vision_tower and not cfg.target_modules:
            target = f"(?:{self.family.language_model_pattern})|(?:{self.family.vision_tower_pattern})"
        modules_to_save = list(cfg.modules_to_save or []) + (list(self.family.projector_modules) if cfg.train_projector else [])
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha or cfg.rank, lora_dropout=cfg.lora_dropout, target_modules=target,
                          modules_to_save=modules_to_save or None, task_type="CAUSAL_LM")
        set_seed(cfg.seed)  # LoRA initialisation, the same whether or not resolving a built-in base above built it (drawing)
        self.model = self._load_init_adapter(model) if cfg.init_adapter else get_peft_model(model, lora)
        cast_training_params(self.model, dtype=torch.float32)  # LoRA (and projector) weights train in fp32
        if not cfg.load_in_4bit:
            self.model.to(self.accelerator.device)
        self.eos_token_id = end_token_id(self.model)

    def _load_init_adapter(self, model) -> PeftModel:
        """The starting adapter's LoRA, trainable; methods with a reference (grpo, dpo) also load it a second time, frozen, as
        the adapter REFERENCE_ADAPTER (only LoRA and fully trained modules are copied, never the base)."""
        cfg = self.config
        folder = resolve_adapter(cfg.init_adapter)
        trained_on = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
        if trained_on.partition("@")[0] != cfg.pretrained_model_name_or_path.partition("@")[0]:
            raise ValueError(f"--init_adapter {cfg.init_adapter} was trained on {trained_on!r}, but the base is {cfg.pretrained_model_name_or_path!r}: "
                             f"pass --pretrained_model_name_or_path {trained_on}")
        if (folder / "processor_config.json").is_file() or (folder / "preprocessor_config.json").is_file():
            self.processor = AutoProcessor.from_pretrained(folder)  # as medfm report loads it
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
        if self.uses_reference:
            peft_model.load_adapter(str(folder), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        logger.info(f"Starting from the adapter {folder}" + (" (also the frozen reference)" if self.uses_reference else ""))
        return peft_model

    uses_reference = False  # methods that compare the policy with the starting one (grpo, dpo) set this

    def reference_policy(self):
        """Context in which the model is the starting policy: the init adapter's frozen copy, else the base (adapter disabled)."""
        model = self.accelerator.unwrap_model(self.model)
        return trl_utils().use_adapter(model, REFERENCE_ADAPTER if REFERENCE_ADAPTER in model.peft_config else None)

    def _setup_data(self) -> None:
        cfg = self.config
        source = dict(train_data_dir=cfg.train_data_dir, train_data_file=cfg.train_data_file, dataset_name=cfg.dataset_name,
                      dataset_config_name=cfg.dataset_config_name, image_column=cfg.image_column, caption_column=cfg.caption_column,
                      image_root=cfg.image_root, indication_column=cfg.indication_column, reports_dir=cfg.reports_dir,
                      phantom_num_images=cfg.phantom_num_images)
        with self.accelerator.main_process_first():
            studies = load_studies(**source, split="train")
            try:
                validation = load_studies(**source, split="validation")
            except (ValueError, FileNotFoundError):  # no validation split: hold some training studies out
                validation = []
        if cfg.max_train_samples:
            studies = studies[: cfg.max_train_samples]
        if not validation:
            random.Random(cfg.seed).shuffle(studies)
            validation, studies = studies[: cfg.num_validation_samples], studies[cfg.num_validation_samples :]
        max_images = cfg.max_images_per_study if self.family.supports_multiple_images else 1
        self.dataset = ReportStudyDataset(studies, cfg.report_section, max_images, self.quarantine, cfg.verify_images)
        validation = validation[: cfg.num_validation_samples]
        self.validation_set = ReportStudyDataset(validation, cfg.report_section, max_images, verify_images=True) if validation else []
        logger.info(f"{len(self.dataset)} usable studies of {len(studies)} ({len(self.quarantine.rows)} skipped); "
                    f"{len(self.validation_set)} for validation; target: the {cfg.report_section} section")
        self.collator = ReportCollator(self.processor, self.family, cfg.instruction, cfg.max_length, self.eos_token_id)
        self.train_dataloader = DataLoader(self.dataset, batch_size=cfg.train_batch_size, shuffle=True, collate_fn=self.train_collator(),
                                           num_workers=cfg.dataloader_num_workers, pin_memory=torch.cuda.is_available())
        self.truncated_rows: set[str] = set()  # studies whose report was cut to fit --max_length

    def train_collator(self):
        """What turns a list of studies into the batch this method's training_step reads."""
        return self.collator

    def trainable_models(self) -> list[torch.nn.Module]:
        return [self.model]

    def _set_prepared_models(self, models: list[torch.nn.Module]) -> None:
        (self.model,) = models

    def save_lora(self, models, directory) -> None:
        models[0].save_pretrained(directory, selected_adapters=["default"])  # not the frozen reference

    def load_lora(self, models, directory) -> None:
        set_peft_model_state_dict(models[0], load_file(Path(directory) / ADAPTER_WEIGHTS_NAME))

    # ------------------------------------------------------------------------------------------------ train
    def training_step(self, batch: dict) -> torch.Tensor:
        """Next-token loss on the report tokens (everything else is labelled -100 by the collator), logits for those only."""
        return report_token_loss(self.model, self._model_inputs(batch))

    def _model_inputs(self, batch: dict) -> dict:
        """What the model reads of a collated (or prompt) batch: its tensors on the device, floating pixel values in the weight
        dtype; the collator's bookkeeping is taken out (the reports it cut to --max_length are recorded)."""
        self.truncated_rows.update(batch.pop("truncated_rows", ()))
        batch.pop("num_examples", None)
        inputs = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.weight_dtype)
        return inputs

    def record_step_values(self, values: dict[str, float]) -> None:
        """A method's numbers for one batch (several per step with gradient accumulation), logged by step_logs."""
        self._step_values = [*getattr(self, "_step_values", []), values]

    def step_logs(self) -> dict[str, float]:
        """The recorded numbers averaged over the step's batches and the processes; also appended to OUTPUT_DIR/train_log.jsonl."""
        values, self._step_values = getattr(self, "_step_values", []), []
        if not values:
            return {}
        names = list(values[0])
        local = torch.tensor([[v[name] for name in names] for v in values], device=self.accelerator.device).mean(dim=0)
        logs = dict(zip(names, self.accelerator.reduce(local, reduction="mean").tolist()))
        if self.accelerator.is_main_process:
            with open(self.output_dir / "train_log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.progress.global_step, **logs}) + "\n")
        return logs

    # ------------------------------------------------------------------------------------------------ outputs
    def _run_validation(self) -> dict | None:
        """Greedy reports for the fixed validation studies; logs BLEU-4, ROUGE-L and a few examples."""
        if not self.accelerator.is_main_process or not len(self.validation_set):
            return None
        examples = [self.validation_set[i] for i in range(len(self.validation_set))]
        examples = [e for e in examples if "bad_row" not in e]
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        with self.accelerator.autocast():
            predictions = generate_reports(model, self.processor, self.family, [e["images"] for e in examples],
                                           [e.get("instruction") or full_instruction(self.config.instruction, e["indication"]) for e in examples],
                                           batch_size=self.config.train_batch_size, max_new_tokens=self.config.validation_max_new_tokens,
                                           show_progress=False, do_sample=False)
        model.train()
        references = [e["report"] for e in examples]
        metrics = quick_report_metrics(predictions, references)
        step = self.progress.global_step
        self.accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=step)
        logger.info(f"step {step}: validation BLEU-4 {metrics['bleu4']:.4f}, ROUGE-L {metrics['rougeL']:.4f}")
        for example, prediction in list(zip(examples, predictions))[:3]:
            logger.info(f"  {example['row_id']}\n    reference: {example['report']}\n    generated: {prediction}")
        path = self.output_dir / "validation" / f"step-{step:06d}.jsonl"
        path.parent.mkdir(exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"row_id": e["row_id"], "reference": e["report"], "generated": p}) + "\n" for e, p in zip(examples, predictions))
        return metrics

    def _save_adapter_weights(self) -> None:
        """PEFT adapter (adapter_model.safetensors + adapter_config.json naming the base) and the processor."""
        model = self.accelerator.unwrap_model(self.model)
        model.peft_config["default"].base_model_name_or_path = self.recorded_base
        model.save_pretrained(self.output_dir, selected_adapters=["default"])
        self.processor.save_pretrained(self.output_dir)
        logger.info(f"{len(self.truncated_rows)} reports were cut to fit --max_length")

    def _write_model_card(self, resolved: TrainConfig, validation: dict | None) -> None:
        write_report_card(self.output_dir, resolved, self.family, num_studies=len(self.dataset),
                          num_bad=len(self.quarantine.rows), num_truncated=len(self.truncated_rows), metrics=validation)
