"""Sequence packing: an sft training step on padded batches against packed rows, side by side in one run.

    python benchmarks/packing.py                       # LLaVA-665k-shaped mix, rows of 1024 tokens, CPU
    python benchmarks/packing.py --rounds 5 --threads 2 --json out.json
    python benchmarks/packing.py --quickstart          # also: padding share of the quickstart's sft stage data

The samples follow LLaVA-665k's shape: ~10% text-only conversations (ShareGPT-like, long), ~50% one to three short
VQA turns, ~40% long multi-turn conversations; every image-bearing sample carries one image of the model's
tokens per image (64 here). Labels cover the answers only. Both runs draw from the same sample stream:
- padded: `batch` samples per step in stream order, padded to the longest (`Collator`, the unpacked path);
- packed: the stream best-fit into rows of `pack_length` tokens over a buffer of `pack_buffer` samples
  (`vlm.data.packing`), `rows` rows per step, isolated by the block-diagonal 4D mask (SDPA on the CPU).
The step is the sft stage's: `next_token_loss` (logits only where labelled), backward, AdamW, with a small
Llama-shaped decoder behind the framework's timm ViT and MLP projector. Padding share is padded slots over all
slots over the whole stream; throughput is real (non-padding) tokens per second, rounds interleaved (padded,
packed, padded, ...) so that machine load hits both alike; the ratio is the median over rounds of each round's
packed rate over its padded one. Targets: packed padding share <= 5%
and packed/padded tokens/s >= 1.5x. The last line is `padding share: padded P%, packed Q%; tokens/s packed/padded
R.RRx`.
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

from vlm.data.collate import Collator  # noqa: E402
from vlm.data.packing import PackedCollator, best_fit, unit_length  # noqa: E402
from vlm.data.processor import IGNORE_INDEX  # noqa: E402

VOCAB = 8000
IMAGE_TOKEN = VOCAB - 1  # the model's <image> id
PAD = 0


def build_model(hidden: int, layers: int, max_length: int):
    from vlm.models.vlm import VisionLanguageModel

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    model = VisionLanguageModel.from_config({
        "encoder": {"_target_": "vlm.models.encoders.timm_vit.TimmEncoder", "model_name": "vit_tiny_patch16_224",
                    "image_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 2, "num_heads": 3},
        "projector": {"_target_": "vlm.models.projectors.MLPProjector", "_partial_": True},
        "decoder": {"_target_": "vlm.models.decoders.build_decoder", "pretrained": False, "config": {
            "model_type": "llama", "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": max_length,
            "vocab_size": VOCAB}},
        "attention": "causal",
    })
    model.image_token_id = IMAGE_TOKEN
    return model.train()


def llava_like(count: int, tokens_per_image: int, max_length: int, seed: int = 0) -> list[dict]:
    """Token-level samples shaped like LLaVA-665k (lengths in tokens, template tokens included), cut at
    `max_length` as the processor cuts them."""
    gen = torch.Generator().manual_seed(seed)

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    samples = []
    for i in range(count):
        kind = float(torch.rand(1, generator=gen))
        if kind < 0.10:  # text-only conversation (ShareGPT-like): several long turns
            images, turns, question, answer = 0, randint(2, 6), (20, 80), (40, 160)
        elif kind < 0.60:  # short VQA: one to three turns of a question and a word or a sentence
            images, turns, question, answer = 1, randint(1, 3), (10, 30), (2, 15)
        else:  # long multi-turn conversation about the image (detailed description, reasoning)
            images, turns, question, answer = 1, randint(3, 8), (12, 40), (20, 90)
        ids, labels = [1], [IGNORE_INDEX]  # bos
        if images:
            ids += [IMAGE_TOKEN] * tokens_per_image
            labels += [IGNORE_INDEX] * tokens_per_image
        for _ in range(turns):
            q = torch.randint(2, IMAGE_TOKEN, (randint(*question) + 6,), generator=gen).tolist()  # + template
            a = torch.randint(2, IMAGE_TOKEN, (randint(*answer) + 1,), generator=gen).tolist()  # + end token
            ids += q + a
            labels += [IGNORE_INDEX] * len(q) + a
        ids, labels = ids[:max_length], labels[:max_length]
        sample = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "key": f"s{i}"}
        if images:
            sample["pixel_values"] = torch.randn(1, 3, 32, 32, generator=gen)
        samples.append(sample)
    return samples


def padded_batches(samples: list[dict], batch: int) -> list[dict]:
    collate = Collator(PAD)
    return [collate(samples[i : i + batch]) for i in range(0, len(samples), batch)]


def packed_batches(samples: list[dict], rows: int, pack_length: int, pack_buffer: int) -> list[dict]:
    collate = PackedCollator(PAD)
    packed = []
    for start in range(0, len(samples), pack_buffer):
        chunk = samples[start : start + pack_buffer]
        packed += [[chunk[i] for i in row] for row in best_fit([unit_length(s) for s in chunk], pack_length)]
    return [collate(packed[i : i + rows]) for i in range(0, len(packed), rows)]


def padding_share(batches: list[dict]) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return 1.0 - real / sum(b["attention_mask"].numel() for b in batches)


def train_seconds(model, optimizer, batches: list[dict]) -> tuple[float, int]:
    """Wall seconds of one sft step per batch, and the real tokens they held."""
    start = time.perf_counter()
    for batch in batches:
        loss = model.next_token_loss(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                     batch.get("pixel_values"), batch.get("position_ids"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, sum(int(b["attention_mask"].sum()) for b in batches)


def quickstart_shares(samples: int, batches: int) -> dict[str, float]:
    """Padding share of the quickstart's sft data (its model, processor and batch size) unpacked and packed."""
    import tempfile

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vlm.data.synthetic.shapes import ensure_shapes
    from vlm.loading import build_processor, load_model
    from vlm.run import _plain

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with tempfile.TemporaryDirectory() as tmp:
        ensure_shapes(Path(tmp) / "shapes", num_train=samples, num_val=20, num_test=20, samples_per_shard=500)
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose("train", overrides=[f"paths.data_dir={tmp}", "stage=sft", "model=tiny_tiled",
                                              "data.num_workers=0"])
        model, tokenizer = load_model(_plain(cfg.model))
        processor = build_processor(model, tokenizer)
        data = OmegaConf.to_container(cfg.data, resolve=True)
        data.pop("prepare")
        from hydra.utils import instantiate

        out = {"batch_size": data["batch_size"], "max_length": processor.max_length}
        for name, extra in (("padded", {}), ("packed", {"packing": True})):
            module = instantiate({**data, **extra})(processor=processor)
            stream = iter(module.train_dataloader())
            out[name] = padding_share([next(stream) for _ in range(batches)])
            out[f"{name}_samples_per_batch"] = len(next(stream)["keys"])
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024, help="samples in the stream (padding share over all)")
    parser.add_argument("--batch", type=int, default=8, help="padded: samples per step")
    parser.add_argument("--rows", type=int, default=2, help="packed: rows per step")
    parser.add_argument("--pack-length", type=int, default=1024)
    parser.add_argument("--pack-buffer", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens-per-image", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per mode")
    parser.add_argument("--steps", type=int, default=3, help="padded steps per round (packed: the same tokens)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quickstart", action="store_true", help="also measure the quickstart sft data")
    parser.add_argument("--quickstart-samples", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.hidden, args.layers, args.pack_length)
    assert model.tokens_per_image == args.tokens_per_image, model.tokens_per_image
    samples = llava_like(args.samples, args.tokens_per_image, args.pack_length)
    lengths = sorted(len(s["input_ids"]) for s in samples)
    padded = padded_batches(samples, args.batch)
    packed = packed_batches(samples, args.rows, args.pack_length, args.pack_buffer)
    shares = {"padded": padding_share(padded), "packed": padding_share(packed)}
    params = sum(p.numel() for p in model.parameters())
    print(f"decoder: Llama hidden {args.hidden} x {args.layers} layers ({params / 1e6:.1f}M parameters with the "
          f"ViT and projector), {args.tokens_per_image} tokens per image; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{len(samples)} samples: median {lengths[len(lengths) // 2]} tokens, 10th-90th percentile "
          f"{lengths[len(lengths) // 10]}-{lengths[9 * len(lengths) // 10]}, max {lengths[-1]}; "
          f"padded {len(padded)} batches of {args.batch}, packed {len(packed)} batches of {args.rows} rows "
          f"of {args.pack_length}")

    # time the same real tokens either way: the packed batches that hold the padded rounds' samples' share
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    per_round = args.steps
    packed_per_round = max(1, round(per_round * len(packed) / len(padded)))
    train_seconds(model, optimizer, padded[:1])  # warm-up, untimed
    train_seconds(model, optimizer, packed[:1])
    rates: dict[str, list[float]] = {"padded": [], "packed": []}
    for r in range(args.rounds):
        for name, batches, n in (("padded", padded, per_round), ("packed", packed, packed_per_round)):
            chosen = [batches[(1 + r * n + i) % len(batches)] for i in range(n)]
            seconds, tokens = train_seconds(model, optimizer, chosen)
            rates[name].append(tokens / seconds)
    median = {name: statistics.median(v) for name, v in rates.items()}
    # each round's packed rate over the padded rate measured right before it: load drift hits both alike
    ratio = statistics.median(p / q for p, q in zip(rates["packed"], rates["padded"]))
    results = {"samples": len(samples), "shares": shares, "tokens_per_s": median, "all_tokens_per_s": rates,
               "ratio": ratio, "args": vars(args) | {"json": str(args.json)}, "load": os.getloadavg()[0]}
    print(f"{'':>8}{'padding share':>15}{'real tokens/s':>15}")
    for name in ("padded", "packed"):
        print(f"{name:>8}{shares[name]:>14.1%}{median[name]:>15.0f}   rounds: "
              + ", ".join(f"{v:.0f}" for v in rates[name]))
    print("packed/padded per round: " + ", ".join(f"{p / q:.2f}x" for p, q in zip(rates["packed"], rates["padded"]))
          + f"; median {ratio:.2f}x (ratio of the medians {median['packed'] / median['padded']:.2f}x)")
    if args.quickstart:
        quick = quickstart_shares(args.quickstart_samples, 16)
        results["quickstart"] = quick
        print(f"quickstart sft data (batch {quick['batch_size']}, max_length {quick['max_length']}): padding share "
              f"padded {quick['padded']:.1%} ({quick['padded_samples_per_batch']} samples a batch), packed "
              f"{quick['packed']:.1%} ({quick['packed_samples_per_batch']} samples a batch)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"padding share: padded {shares['padded']:.0%}, packed {shares['packed']:.0%}; "
          f"tokens/s packed/padded {ratio:.2f}x")
    return results


if __name__ == "__main__":
    main()
