"""Training throughput of the tiny VLM with 1 and 2 CPU processes (DDP over gloo, and FSDP2), side by side.

Each configuration runs in its own process tree (Lightning's `ddp` and ModelParallelStrategy start rank 1 by running
this script again); batches are synthetic and pre-built, so the figures measure the training step and the gradient
exchange, not data loading. Every process gets the same per-device batch: 2 processes do twice the samples per step.

    python benchmarks/ddp_scaling.py [--steps 30] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 5
CONFIGS = [  # name, processes, threads per process, strategy
    ("1 process, 1 thread", 1, 1, "auto"),
    ("1 process, 2 threads", 1, 2, "auto"),
    ("2 processes (DDP), 1 thread each", 2, 1, "ddp"),
    ("2 processes (FSDP2), 1 thread each", 2, 1, "fsdp"),
]


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import lightning as L
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vlm.loading import load_model
    from vlm.stages.generative import GenerativeStage

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data_dir={args.data}"])
    torch.manual_seed(0)
    model, _ = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    gen = torch.Generator().manual_seed(int(os.environ.get("LOCAL_RANK", 0)))
    size, n, text = model.encoder.image_size, args.batch, 48
    batches = []
    for _ in range(args.steps):
        ids = torch.randint(20, 200, (n, text), generator=gen)
        ids = torch.cat([torch.full((n, model.tokens_per_image), model.image_token_id), ids], 1)
        labels = ids.clone()
        labels[:, : model.tokens_per_image] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                        "pixel_values": torch.randn(n, 3, size, size, generator=gen)})

    class Timer(L.Callback):
        start = end = 0.0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == WARMUP:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.end = time.perf_counter()

    if args.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy
        strategy = DDPStrategy(process_group_backend="gloo")
    elif args.strategy == "fsdp":
        from vlm.distributed import FSDP2Strategy
        strategy = FSDP2Strategy()
    else:
        strategy = "auto"
    stage = GenerativeStage(model, trainable=["encoder", "projector", "decoder"], optim={"lr": 1e-3, "warmup_steps": 2})
    timer = Timer()
    trainer = L.Trainer(accelerator="cpu", devices=args.processes, strategy=strategy, max_steps=args.steps,
                        logger=False, callbacks=[timer], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, use_distributed_sampler=False)
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    if trainer.is_global_zero:
        steps = args.steps - WARMUP
        seconds = timer.end - timer.start
        Path(args.out).write_text(json.dumps({
            "step_ms": 1e3 * seconds / steps, "samples_per_s": steps * n * args.processes / seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="per process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from vlm.data.synthetic.shapes import ensure_shapes

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ensure_shapes(Path(tmp) / "shapes", num_train=100, num_val=10, num_test=10, samples_per_shard=100)
        for name, processes, threads, strategy in CONFIGS:
            out = Path(tmp) / "result.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
            cmd = [sys.executable, __file__, "--worker", f"--processes={processes}", f"--threads={threads}",
                   f"--strategy={strategy}", f"--data={tmp}", f"--out={out}", f"--steps={args.steps}",
                   f"--batch={args.batch}"]
            subprocess.run(cmd, env=env, check=True, timeout=900, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, cwd=REPO)
            results[name] = json.loads(out.read_text())
            print(f"{name:<38} {results[name]['step_ms']:8.1f} ms/step {results[name]['samples_per_s']:8.1f} "
                  f"samples/s", flush=True)
    base = results[CONFIGS[0][0]]["samples_per_s"]
    print(f"\nper-process batch {args.batch}, {args.steps - WARMUP} timed steps, {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'configuration':<38} {'samples/s':>10} {'vs 1 process, 1 thread':>24}")
    for name, r in results.items():
        print(f"{name:<38} {r['samples_per_s']:10.1f} {r['samples_per_s'] / base:23.2f}x")


if __name__ == "__main__":
    main()
