"""What every stage shares: which parts train, the optimizer and schedule, and the parameter report.

A stage names the parts it trains (`trainable: [projector, decoder]`); everything else is frozen, so the same
model object serves every stage and the choice lives in config, not in code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn


def set_trainable(model: nn.Module, trainable: Iterable[str]) -> None:
    """Freeze every parameter, then unfreeze the named child modules (dotted paths allowed)."""
    trainable = list(trainable)
    known = {name for name, _ in model.named_children()}
    for name in trainable:
        if name.split(".")[0] not in known:
            raise ValueError(f"trainable part {name!r} is not a part of this model; parts are {sorted(known)}")
    model.requires_grad_(False)
    for name in trainable:
        model.get_submodule(name).requires_grad_(True)


def parameter_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(trainable, frozen) parameter counts per top-level part."""
    counts = {}
    for name, part in model.named_children():
        params = list(part.parameters())
        trained = sum(p.numel() for p in params if p.requires_grad)
        counts[name] = (trained, sum(p.numel() for p in params) - trained)
    return counts


def format_parameter_counts(counts: Mapping[str, tuple[int, int]]) -> str:
    lines = [f"{'part':<12}{'trainable':>14}{'frozen':>14}"]
    for name, (trained, frozen) in counts.items():
        lines.append(f"{name:<12}{trained:>14,}{frozen:>14,}")
    total_t = sum(t for t, _ in counts.values())
    total_f = sum(f for _, f in counts.values())
    lines.append(f"{'total':<12}{total_t:>14,}{total_f:>14,}")
    return "\n".join(lines)


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norms, embeddings-scale scalars and learned temperatures are not decayed."""
    return param.ndim < 2 or "norm" in name.lower() or "logit_scale" in name or "logit_bias" in name


class Stage(L.LightningModule):
    """Base LightningModule: freezing by config, AdamW with warmup + schedule, parameter report."""

    def __init__(
        self,
        model: nn.Module,
        trainable: Iterable[str],
        optim: Mapping[str, Any] | None = None,
        name: str = "stage",
    ) -> None:
        super().__init__()
        self.model = model
        self.stage_name = name
        self.trainable = list(trainable)
        self.optim = dict(optim or {})
        set_trainable(self.model, self.trainable)

    def on_fit_start(self) -> None:
        rank_zero_info(f"[{self.stage_name}] trains {self.trainable}\n{format_parameter_counts(parameter_counts(self.model))}")

    def configure_optimizers(self):
        from transformers import get_scheduler

        opt = self.optim
        decay, plain = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (plain if no_decay(name, param) else decay).append(param)
        if not decay and not plain:
            raise ValueError(f"stage {self.stage_name!r} has nothing to train: trainable={self.trainable}")
        groups = [
            {"params": decay, "weight_decay": opt.get("weight_decay", 0.0)},
            {"params": plain, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=opt.get("lr", 1e-3),
            betas=tuple(opt.get("betas", (0.9, 0.999))),
            eps=opt.get("eps", 1e-8),
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = opt.get("warmup_steps")
        if warmup is None:
            warmup = int(opt.get("warmup_ratio", 0.03) * total)
        scheduler = get_scheduler(
            opt.get("scheduler", "cosine"), optimizer, num_warmup_steps=warmup, num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
