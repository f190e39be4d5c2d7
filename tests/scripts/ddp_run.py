"""DDP on 2 CPU processes (gloo) with fixed batches, for tests/test_distributed.py.

    python tests/scripts/ddp_run.py INPUT.pt OUTPUT_DIR

INPUT.pt holds `base` (a model directory), `steps`, and `batches[rank][step]`. Lightning's `ddp` starts rank 1 by
running this script again. Rank 0 writes OUTPUT_DIR/weights.pt (the trained model's state dict), then a second
fit in which rank 1's second batch has NaN pixels and `nonfinite_loss=skip` writes OUTPUT_DIR/skip.pt with the
skipped-step count and the weights of both ranks (they must agree: every rank skipped the same step).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import lightning as L

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

OPTIM = {"lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.01, "scheduler": "cosine"}


def fit(stage, batches, steps: int, strategy) -> L.Trainer:
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, use_distributed_sampler=False)
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def main() -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from vlm.models.vlm import VisionLanguageModel
    from vlm.stages.generative import GenerativeStage

    spec = torch.load(sys.argv[1], weights_only=False)
    out = Path(sys.argv[2])
    rank = int(os.environ.get("LOCAL_RANK", 0))
    batches = spec["batches"][rank]

    model, _ = VisionLanguageModel.from_pretrained(spec["base"])
    stage = GenerativeStage(model, trainable=["projector", "decoder"], optim=OPTIM)
    trainer = fit(stage, batches, spec["steps"], DDPStrategy(process_group_backend="gloo"))
    if trainer.is_global_zero:
        torch.save({k: v.detach().clone() for k, v in stage.model.state_dict().items()}, out / "weights.pt")

    model, _ = VisionLanguageModel.from_pretrained(spec["base"])
    stage = GenerativeStage(model, trainable=["projector"], optim=OPTIM)
    stage.nonfinite_loss = "skip"
    poisoned = [dict(b) for b in batches]
    if rank == 1:
        poisoned[1]["pixel_values"] = torch.full_like(poisoned[1]["pixel_values"], float("nan"))
    trainer = fit(stage, poisoned, 2, DDPStrategy(process_group_backend="gloo"))
    weights = stage.model.projector.state_dict()
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, {k: v.clone() for k, v in weights.items()})
    if trainer.is_global_zero:
        torch.save({"skipped": stage.skipped_steps, "global_step": trainer.global_step, "ranks": gathered},
                   out / "skip.pt")


if __name__ == "__main__":
    main()
