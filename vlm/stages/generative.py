"""The next-token stages: `lm` (text warm-up), `align` (LLaVA stage 1) and `sft` (instruction tuning).

They differ only in configuration - which parts train, which record format the data gives, LoRA or not - so they
share this one module; `conf/stage/{lm,align,sft}.yaml` are the three presets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from vlm.stages.accounting import TokenAccounting
from vlm.stages.base import Stage


def apply_lora(decoder: nn.Module, lora: Mapping[str, Any]) -> nn.Module:
    """Wrap the decoder with peft LoRA adapters; only the adapters train afterwards."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.get("r", 8),
        lora_alpha=lora.get("alpha", 16),
        lora_dropout=lora.get("dropout", 0.05),
        target_modules=list(lora.get("target_modules", ["q_proj", "v_proj"])),
        bias="none",
    )
    return get_peft_model(decoder, config)


class GenerativeStage(Stage):
    """Causal-LM loss on the labelled tokens (assistant replies, or all text for `lm`)."""

    def __init__(
        self,
        model: nn.Module,
        trainable: Iterable[str],
        optim: Mapping[str, Any] | None = None,
        name: str = "sft",
        data_format: str = "conversation",
        lora: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model, trainable, optim, name)
        self.data_format = data_format
        self.lora = dict(lora) if lora else None
        self.accounting = TokenAccounting()  # train/tokens, train/padding_share, train/tokens_per_s
        if self.lora:
            if "decoder" not in self.trainable:
                raise ValueError("LoRA trains the decoder's adapters: add 'decoder' to stage.trainable")
            self.model.decoder = apply_lora(self.model.decoder, self.lora)

    def loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The next-token loss over the batch's labelled tokens (logits computed only where they count); a packed
        batch (`vlm.data.packing`) carries position ids that restart at every sample."""
        return self.model.next_token_loss(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                          batch.get("pixel_values"), batch.get("position_ids"))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.accounting.add(batch["attention_mask"])
        trainer = self._trainer
        if trainer is not None and trainer._logger_connector.should_update_logs:  # the same steps on every rank
            self.log_dict(self.accounting.metrics(trainer.strategy), batch_size=batch["input_ids"].shape[0])
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["token_accounting"] = self.accounting.state_dict(self.trainer.strategy)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "token_accounting" in checkpoint:
            self.accounting.load_state_dict(checkpoint["token_accounting"], int(self.trainer.global_rank))

    def on_train_end(self) -> None:
        """The end-of-stage accounting line (a collective under DDP/FSDP, so every rank computes it)."""
        super().on_train_end()
        line = self.accounting.summary(self.trainer.strategy)
        rank_zero_info(f"[{self.stage_name}] {line}")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        loss = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def export(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """Write a self-contained model directory; LoRA adapters are saved beside it and merged into it."""
        directory = Path(directory)
        if self.lora:
            self.model.decoder.save_pretrained(str(directory.parent / f"{directory.name}-lora-adapter"))
            self.model.decoder = self.model.decoder.merge_and_unload()
        self.model.save_pretrained(directory, tokenizer)
        return directory
