"""FLIP speed-up: training throughput (forward + backward) of a ViT-S/16-sized encoder at 224 px on the CPU with
patch masking at ratio 0.5 and 0.75 against no masking, measured side by side in one run.

    python benchmarks/flip_speedup.py                      # ViT-S/16, 224 px, batch 16, ratios 0 / 0.5 / 0.75
    python benchmarks/flip_speedup.py --batch 8 --rounds 7 --threads 2 --json out.json

The encoder is the framework's own `TimmEncoder` (random weights, nothing downloaded) and the step is the clip
stage's image side: `forward_pooled(pixels, mask_ratio)` (masking after the position embeddings, the blocks run on
the kept tokens only), a scalar loss, `backward()`. Ratios are measured in interleaved rounds (0, 0.5, 0.75, 0, ...)
so that a change in machine load hits all of them alike; the median round per ratio is reported. Ideal speed-ups
are 2x and 4x (fewer tokens; attention shrinks quadratically, but the patch embedding still sees every patch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.models.encoders import TimmEncoder  # noqa: E402
from vlm.models.masking import num_kept  # noqa: E402

TARGETS = {0.5: 1.7, 0.75: 3.0}


def step_seconds(encoder: TimmEncoder, pixels: torch.Tensor, ratio: float, steps: int) -> float:
    """Wall seconds of `steps` forward+backward passes (gradients cleared between them)."""
    probe = torch.randn(encoder.hidden_size, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for _ in range(steps):
        pooled = encoder.forward_pooled(pixels, ratio)
        (pooled @ probe).square().mean().backward()
        encoder.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm ViT (ViT-S/16: width 384, 12 blocks)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds per ratio")
    parser.add_argument("--steps", type=int, default=2, help="forward+backward passes per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes per ratio first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = TimmEncoder(args.model, pretrained=False, image_size=args.image_size).train()
    rows, cols = encoder.grid
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size)
    params = sum(p.numel() for p in encoder.parameters())
    print(f"{args.model}: {params / 1e6:.1f}M parameters, {args.image_size} px, {rows}x{cols} patches "
          f"+ {encoder.num_prefix_tokens} prefix; batch {args.batch}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    for ratio in args.ratios:
        step_seconds(encoder, pixels, ratio, args.warmup)
    times: dict[float, list[float]] = {r: [] for r in args.ratios}
    for _ in range(args.rounds):
        for ratio in args.ratios:
            times[ratio].append(step_seconds(encoder, pixels, ratio, args.steps) / args.steps)

    base = statistics.median(times[args.ratios[0]])
    results = {"model": args.model, "image_size": args.image_size, "batch": args.batch,
               "threads": torch.get_num_threads(), "rounds": args.rounds, "ratios": {}}
    print(f"\n{'mask ratio':>10}{'tokens':>8}{'s/step':>9}{'img/s':>9}{'speed-up':>10}{'target':>8}")
    for ratio in args.ratios:
        median = statistics.median(times[ratio])
        speedup = base / median
        target = TARGETS.get(ratio)
        tokens = encoder.num_prefix_tokens + num_kept(rows * cols, ratio)
        results["ratios"][str(ratio)] = {"tokens": tokens, "seconds_per_step": median,
                                         "images_per_second": args.batch / median, "speedup": speedup,
                                         "target": target, "all_seconds": times[ratio]}
        mark = "" if target is None else (" ok" if speedup >= target else " MISSED")
        print(f"{ratio:>10.2f}{tokens:>8}{median:>9.3f}{args.batch / median:>9.1f}{speedup:>9.2f}x"
              f"{'' if target is None else f'{target:>7.1f}x'}{mark}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
