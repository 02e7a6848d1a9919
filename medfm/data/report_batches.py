"""Model inputs for report generation: prompts with images, and training batches whose loss covers report tokens only.

A training sequence is the processor's prompt (chat template + image tokens, expanded by the processor)
followed by the report tokens and an end token. Only report text is ever cut (at a sentence boundary) to
fit `max_length`, so image tokens always match the image features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.vlm import VLMFamily, answer_prefix, build_prompt
from .reports import truncate_to_tokens

IGNORE_INDEX = -100


def full_instruction(instruction: str, indication: str | None) -> str:
    """The instruction, with the indication / clinical history when the study has one (LLaVA-Rad style)."""
    return f"{instruction}\nIndication: {indication}" if indication else instruction


def encode_prompts(processor, family: VLMFamily, instructions: list[str], images: list[list]) -> dict:
    """Left-padded prompt batch for `model.generate` (also the prompt half of training sequences)."""
    prompts = [build_prompt(processor, family, text, len(study_images)) for text, study_images in zip(instructions, images)]
    tokenizer = processor.tokenizer
    # A chat template that writes the BOS itself (Gemma 3) gets no second one from the tokenizer, as in transformers' apply_chat_template
    starts_with_bos = tokenizer.bos_token is not None and all(prompt.startswith(tokenizer.bos_token) for prompt in prompts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        encoded = processor(text=prompts, images=images, padding=True, return_tensors="pt", **({"add_special_tokens": False} if starts_with_bos else {}))
    finally:
        tokenizer.padding_side = side
    encoded.pop("labels", None)  # PaliGemma's processor adds all -100 labels when no suffix is given
    return encoded


def report_token_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the report tokens (the collator's `labels`), the same value as the model's own
    loss, but with the output layer applied from the first report position on only: over the prompt's image tokens it
    would cost most of the step (a real VLM: ~1,000 image tokens times a 150k vocabulary, in float32)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    first = max(int((labels != IGNORE_INDEX).int().argmax(dim=1).min()), 1)  # the earliest report token in the batch
    logits = model(**inputs, logits_to_keep=labels.shape[1] - first + 1).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, first:].reshape(-1).to(logits.device),
                           ignore_index=IGNORE_INDEX)


def token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the labelled tokens and their mask, both (batch, T): logits from the first labelled position on only
    (as report_token_loss), log-softmax and gather in TRL's memory-saving selective_log_softmax."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    first = max(int((labels != IGNORE_INDEX).int().argmax(dim=1).min()), 1)
    logits = model(**inputs, logits_to_keep=labels.shape[1] - first + 1).logits[:, :-1]
    targets = labels[:, first:].to(logits.device)
    mask = targets != IGNORE_INDEX
    return trl_utils().selective_log_softmax(logits.float(), targets.clamp(min=0)), mask


def trl_utils():
    """trl.trainer.utils, or an error that says how to install it."""
    try:
        from trl.trainer import utils
    except ImportError as err:
        raise ImportError(f"--method grpo and dpo use TRL: pip install 'medfm[align]' (trl>=1.16) ({err})") from err
    return utils


def end_token_id(model) -> int:
    """The token generation stops at (the end of the assistant's turn for chat models)."""
    eos = model.generation_config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


class ReportCollator:
    """Batches of studies -> model inputs with `labels` = -100 everywhere but the report and its end token (an example's
    own `instruction`, e.g. a preference pair's prompt, replaces the configured one)."""

    def __init__(self, processor, family: VLMFamily, instruction: str, max_length: int, eos_token_id: int):
        self.processor, self.family, self.instruction = processor, family, instruction
        self.max_length, self.eos_token_id = max_length, eos_token_id
        self.pad_token_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else eos_token_id
        self.answer_prefix = answer_prefix(processor, family)  # e.g. the space after LLaVA's "ASSISTANT:"
        # Sequence-aligned processor outputs and the value their report tokens take (others: 0)
        self.report_fill = {"attention_mask": 1, "token_type_ids": family.report_token_type_id}

    def count_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=False).input_ids)

    def __call__(self, examples: list[dict]) -> dict:
        bad_rows = [e["bad_row"] for e in examples if "bad_row" in e]
        good = [e for e in examples if "bad_row" not in e]
        batch = {"bad_rows": bad_rows, "num_examples": len(good)}
        if not good:
            return batch
        encoded = encode_prompts(self.processor, self.family, [e.get("instruction") or full_instruction(self.instruction, e["indication"])
                                                               for e in good], [e["images"] for e in good])
        sequence_keys = [k for k, v in encoded.items() if torch.is_tensor(v) and v.shape[:2] == encoded["input_ids"].shape]
        rows, truncated = [], []
        for i, example in enumerate(good):
            keep = encoded["attention_mask"][i].bool()
            row = {k: encoded[k][i][keep].tolist() for k in sequence_keys}
            budget = self.max_length - len(row["input_ids"]) - 1
            if budget < 1:
                raise ValueError(f"--max_length {self.max_length} leaves no room for the report: the prompt with its image tokens "
                                 f"is {len(row['input_ids'])} tokens. Raise --max_length.")
            text, was_cut = truncate_to_tokens(example["report"], lambda t: self.count_tokens(self.answer_prefix + t), budget)
            if was_cut:
                truncated.append(example["row_id"])
            report_ids = self.processor.tokenizer(self.answer_prefix + text, add_special_tokens=False).input_ids[:budget] + [self.eos_token_id]
            prompt_length = len(row["input_ids"])
            for key in sequence_keys:
                fill = report_ids if key == "input_ids" else [self.report_fill.get(key, 0)] * len(report_ids)
                row[key] = row[key] + fill
            row["labels"] = [IGNORE_INDEX] * prompt_length + report_ids
            rows.append(row)
        longest = max(len(row["input_ids"]) for row in rows)
        pad_values = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        for key in rows[0]:
            batch[key] = torch.tensor([row[key] + [pad_values.get(key, 0)] * (longest - len(row[key])) for row in rows])
        batch.update({k: v for k, v in encoded.items() if k not in sequence_keys})
        batch["truncated_rows"] = truncated
        return batch


class PromptCollator:
    """Batches of studies -> what sampling needs: the studies' images, instructions, references and row ids (prompts are
    encoded later, once per sampled report)."""

    def __init__(self, instruction: str):
        self.instruction = instruction

    def __call__(self, examples: list[dict]) -> dict:
        good = [e for e in examples if "bad_row" not in e]
        return {"bad_rows": [e["bad_row"] for e in examples if "bad_row" in e], "num_examples": len(good),
                "images": [e["images"] for e in good], "instructions": [full_instruction(self.instruction, e["indication"]) for e in good],
                "references": [e["report"] for e in good], "row_ids": [e["row_id"] for e in good]}
