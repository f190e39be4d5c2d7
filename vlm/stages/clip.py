"""The `clip` stage: contrastive image-text pretraining of a dual encoder (CLIP's InfoNCE or SigLIP's sigmoid loss),
with FLIP patch masking and an optional unmasked tuning phase at the end.

Under DDP/FSDP each rank scores its own pairs against every rank's (`vlm.losses.gather_features`), so the negatives
are the global batch's. The learned log-scale is clamped at log(100) after every optimizer step. Validation logs the
unmasked loss and, at its end, the stage's evaluation tasks (zero-shot classification, retrieval) on rank zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from vlm.models.masking import check_mask_ratio
from vlm.stages.base import Stage


class ClipStage(Stage):
    """mask_ratio: FLIP's share of patch tokens dropped per image in training (0 = off).
    unmasked_steps / unmasked_share: the last N steps (or that share of `max_steps`) run at ratio 0; the larger wins.
    eval_tasks: name -> object with `evaluate(model) -> {"<task>/<metric>": value}`, run after each validation.
    """

    def __init__(
        self,
        model: nn.Module,
        trainable: Iterable[str],
        optim: Mapping[str, Any] | None = None,
        name: str = "clip",
        data_format: str = "caption",
        mask_ratio: float = 0.0,
        unmasked_steps: int = 0,
        unmasked_share: float = 0.0,
        eval_tasks: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model, trainable, optim, name)
        check_mask_ratio(mask_ratio)
        if unmasked_steps < 0 or not 0.0 <= unmasked_share <= 1.0:
            raise ValueError("unmasked_steps must be >= 0 and unmasked_share in [0, 1]")
        self.data_format = data_format
        self.mask_ratio = float(mask_ratio)
        self.unmasked_steps = int(unmasked_steps)
        self.unmasked_share = float(unmasked_share)
        self.eval_tasks = {k: v for k, v in dict(eval_tasks or {}).items() if v is not None}

    # ---- schedule -------------------------------------------------------------------------------------------
    def total_steps(self) -> int:
        trainer = self._trainer
        if trainer is None:
            return 0
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        return int(trainer.estimated_stepping_batches)

    def mask_ratio_at(self, step: int, total: int) -> float:
        """FLIP's ratio for optimizer step `step` of `total`: 0 during the final unmasked phase."""
        unmasked = max(self.unmasked_steps, round(self.unmasked_share * total))
        return 0.0 if step >= total - unmasked else self.mask_ratio

    # ---- steps ----------------------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Any], mask_ratio: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], mask_ratio=mask_ratio)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        ratio = self.mask_ratio_at(self.global_step, self.total_steps()) if self.mask_ratio else 0.0
        image, text = self(batch, ratio)
        loss = self.model.loss(image, text, gather=True)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/logit_scale", self.model.logit_scale.detach().squeeze(), batch_size=size)
        self.log("train/mask_ratio", ratio, batch_size=size)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.model.clamp_logit_scale()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        # local pairs only: ranks may hold different numbers of validation batches, so nothing is gathered here
        image, text = self(batch)
        loss = self.model.loss(image, text, gather=False)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self.eval_tasks or self.trainer.sanity_checking:
            return
        from vlm.distributed import uses_fsdp2

        if uses_fsdp2(self.trainer.strategy):
            # the tasks call the model's methods on rank zero, outside the FSDP2 units' forward hooks that gather
            # the shards from every rank: they would wait forever. Evaluate the consolidated model directory.
            if not getattr(self, "_warned_fsdp_eval", False):
                rank_zero_warn(f"[{self.stage_name}] zero-shot/retrieval checks are skipped under FSDP; run "
                               "evaluate.py task=zeroshot model_dir=<run>/model after the stage")
                self._warned_fsdp_eval = True  # once per run, not per validation
            return
        if not self.trainer.is_global_zero:
            return
        for task in self.eval_tasks.values():
            metrics = task.evaluate(self.model)
            self.log_dict({f"val/{k}": float(v) for k, v in metrics.items() if not k.endswith("/count")},
                          rank_zero_only=True)

    def export(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """Write the dual encoder's model directory (its `encoder.*` weights can seed a VLM stage's encoder)."""
        return self.model.save_pretrained(directory, tokenizer)
