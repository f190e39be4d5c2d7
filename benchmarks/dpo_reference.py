"""Peak memory and step time of the dpo stage's three reference modes, side by side in one run.

All three train the same LoRA adapters (r 8 on q_proj, v_proj) of the same model on the same preference batches
(the shapes world's pairs); they differ only in where the reference log-probabilities come from:
`copy` (a frozen second model), `adapter` (the same model, adapters disabled) and `precomputed` (a first pass
writes them beside the data; training holds no reference model; the pass's own time is reported separately).
Each mode runs in a fresh process, so its peak memory is its own: the peak resident set size above the
process's size before the model was built (on CUDA: `max_memory_allocated`). Rounds alternate the modes, and the
median step time per mode is reported, since these machines are noisy.

    python benchmarks/dpo_reference.py [--steps 12] [--rounds 2] [--hidden 512] [--layers 8] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("copy", "adapter", "precomputed")
WARMUP = 2
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def child(args: argparse.Namespace) -> dict:
    """One mode in this process: build, (precompute,) train `steps` steps; times and memory."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vlm.data.datamodule import DataModule
    from vlm.loading import build_processor, load_model
    from vlm.stages.preference import DPOStage

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.data_dir={args.data}", "model=tiny_tiled", f"model.decoder.config.hidden_size={args.hidden}",
            f"model.decoder.config.intermediate_size={args.hidden * 3}",
            f"model.decoder.config.num_hidden_layers={args.layers}", "model.decoder.config.num_attention_heads=8",
            "model.decoder.config.num_key_value_heads=8"])
    pref = Path(args.data) / "shapes" / "dpo" / "preference"
    torch.manual_seed(0)
    model, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    dm = DataModule(build_processor(model, tokenizer), train=str(pref / "train.txt"), val=str(pref / "val.txt"),
                    format="preference", batch_size=args.batch, num_workers=0, seed=0)
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(args.steps)]
    del loader
    if device.type == "cuda":
        batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    # the model as built is in memory from here on in every mode; what differs is what each mode adds
    base_rss = rss_mb()
    if device.type == "cuda":
        model.to(device)
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() / 2**20
    stage = DPOStage(model, ["decoder"], lora=LORA, reference=args.mode, reference_cache=str(Path(args.data) / "cache"))
    stage.to(device)
    precompute_s = None
    if args.mode == "precomputed":
        # a one-pass over the first `steps` batches' pairs stands in for the data set (what the cost scales with)
        start = time.perf_counter()
        with torch.no_grad():
            values = {}
            for batch in batches:
                feats = model.encode_images(batch["pixel_values"])
                logps = DPOStage.pair_logps(stage.model, batch, feats)[0].float().cpu()
                n = len(batch["keys"])
                values.update({k: (float(logps[i]), float(logps[n + i])) for i, k in enumerate(batch["keys"])})
        stage.reference_logps = values
        precompute_s = (time.perf_counter() - start) / sum(len(b["keys"]) for b in batches)
    params = [p for p in stage.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i, batch in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = stage.preference_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    out = {"mode": args.mode, "step_s": statistics.median(times), "peak_mb": peak_rss_mb() - base_rss,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "reference_params_m": (sum(p.numel() for p in stage.reference_model.parameters()) / 1e6
                                  if stage.reference_model is not None else 0.0),
           "precompute_s_per_pair": precompute_s, "pairs_per_step": args.batch}
    if device.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 - base_cuda
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default=None, help="default: a temporary folder")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # a child process's mode
    args = parser.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(child(args)))
        return

    from vlm.data.synthetic.preferences import ensure_shapes_preferences

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data or tmp)
        ensure_shapes_preferences(data / "shapes", num_train=200, num_val=20, num_test=20, samples_per_shard=100)
        results: dict[str, list[dict]] = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                cmd = [sys.executable, __file__, "--mode", mode, "--data", str(data)] + [
                    f"--{k}={getattr(args, k)}" for k in ("steps", "batch", "hidden", "layers", "threads", "device")]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode or not lines:
                    sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
                results[mode].append(json.loads(lines[-1][len("RESULT "):]))
    first = results["copy"][0]
    print(f"model {first['params_m']:.1f} M parameters, {args.batch} pairs per step, {args.steps} steps "
          f"({WARMUP} warm-up) x {args.rounds} rounds, {args.threads} thread(s), {args.device}")
    print(f"{'reference':<12}{'step (s)':>10}{'vs copy':>9}{'peak (MB)':>11}{'ref params (M)':>16}"
          f"{'first pass (ms/pair)':>22}")
    copy_step = statistics.median(r["step_s"] for r in results["copy"])
    for mode in MODES:
        step = statistics.median(r["step_s"] for r in results[mode])
        peak = statistics.median(r["peak_mb"] for r in results[mode])
        pre = results[mode][0]["precompute_s_per_pair"]
        print(f"{mode:<12}{step:>10.3f}{step / copy_step:>9.2f}{peak:>11.0f}"
              f"{results[mode][0]['reference_params_m']:>16.1f}{(f'{pre * 1000:.1f}' if pre else '-'):>22}")


if __name__ == "__main__":
    main()
