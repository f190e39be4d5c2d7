"""Time per training step: our LightningModule + Trainer against a bare PyTorch loop, same model and batches.

Both loops do the same work per step (forward, backward, gradient clipping, AdamW, LR schedule); the Lightning run
also logs the loss every step and keeps its progress bar, as a real run does. The two alternate several times in
one process and the medians are compared, since these machines are noisy.

    python benchmarks/step_overhead.py [--steps 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vlm.data.synthetic.shapes import ensure_shapes
from vlm.loading import build_processor, load_model
from vlm.stages.generative import GenerativeStage

CONF = str(Path(__file__).resolve().parents[1] / "conf")
WARMUP = 5


def make_batches(data_dir: Path, steps: int):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data_dir={data_dir}", "stage=sft", "data.num_workers=0",
                                          f"run_dir={data_dir}/run"])
    from hydra.utils import instantiate

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    instantiate(data_cfg.pop("prepare"))
    model, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    datamodule = instantiate(data_cfg)(processor=build_processor(model, tokenizer))
    loader = iter(datamodule.train_dataloader())
    batches = [next(loader) for _ in range(steps)]
    for b in batches:
        b.pop("keys", None)
    return model, batches


def bare_loop(model: torch.nn.Module, batches: list[dict]) -> float:
    stage = GenerativeStage(model, trainable=["encoder", "projector", "decoder"], optim={"lr": 1e-3})
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    plain = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": plain, "weight_decay": 0.0}], lr=1e-3)
    from transformers import get_scheduler

    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=len(batches))
    model.train()
    start = 0.0
    for i, batch in enumerate(batches):
        if i == WARMUP:
            start = time.perf_counter()
        loss = stage.loss(batch)  # the same loss computation as training_step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / (len(batches) - WARMUP)


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.start = 0.0
        self.end = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == WARMUP:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def lightning_loop(model: torch.nn.Module, batches: list[dict], root: Path) -> float:
    stage = GenerativeStage(model, trainable=["encoder", "projector", "decoder"], optim={"lr": 1e-3, "warmup_steps": 2})
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", max_steps=len(batches), logger=L.pytorch.loggers.CSVLogger(root),
                        callbacks=[timer], enable_checkpointing=False, enable_model_summary=False,
                        gradient_clip_val=1.0, log_every_n_steps=25, default_root_dir=root)
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return (timer.end - timer.start) / (len(batches) - WARMUP)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ensure_shapes(tmp / "shapes", num_train=2000, num_val=100, num_test=100, samples_per_shard=1000)
        model, batches = make_batches(tmp, args.steps)
        bare, ours = [], []
        for r in range(args.rounds):
            bare.append(bare_loop(copy.deepcopy(model), batches))
            ours.append(lightning_loop(copy.deepcopy(model), batches, tmp / f"pl{r}"))
            print(f"round {r}: bare {bare[-1] * 1e3:.1f} ms/step, lightning {ours[-1] * 1e3:.1f} ms/step")
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"\nbatch {batches[0]['input_ids'].shape}, {torch.get_num_threads()} threads")
    print(f"bare PyTorch loop      {b * 1e3:8.1f} ms/step (median of {args.rounds})")
    print(f"vlm stage + Trainer    {o * 1e3:8.1f} ms/step")
    print(f"ratio (ours / bare)    {o / b:8.3f}   target <= 1.10")


if __name__ == "__main__":
    main()
