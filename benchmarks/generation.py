"""Generation speed: our KV-cached loop against recomputing the prefix each step, against Hugging Face's
`generate(inputs_embeds=...)` on the same decoder fed the same embeddings, and against transformers'
`LlavaForConditionalGeneration.generate` on the model exported with `vlm.interop.llava` (written to a temporary
directory and loaded back with `from_pretrained`; it embeds the image itself, from the same pixels).

The model is a VisionLanguageModel with a tiny CLIP vision tower (64 image tokens, CLS dropped, layer -2: a Llava
model) and a random Llama large enough for the decoder to dominate (hidden 512, 8 layers, 32k vocabulary). Each
prompt is 16 text tokens, an image, 16 text tokens; in a batch the rows are 0..7 tokens shorter and left-padded.
Every method generates exactly 64 new tokens greedily (no end token); all four must produce identical tokens.
Methods alternate for several rounds in one process; on a shared machine other processes only ever add time, so
ratios use each method's best round (the medians are printed beside them). The slow recompute baseline runs
`--recompute-rounds` rounds (default 1).

    python benchmarks/generation.py [--rounds 5] [--new-tokens 64] [--batch-sizes 1 8] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from vlm.evaluation.generation import generate
from vlm.models.decoders import build_decoder
from vlm.models.encoders.hf import HFVisionEncoder
from vlm.models.projectors import MLPProjector
from vlm.models.vlm import VisionLanguageModel

VOCAB = 32000
IMAGE_TOKEN = VOCAB - 1
PAD = 0


def build_model(hidden: int, layers: int) -> VisionLanguageModel:
    torch.manual_seed(0)
    encoder = HFVisionEncoder("clip", feature_layer=-2, config={  # the tiny ViT's shapes, as a CLIP tower
        "hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 3,
        "image_size": 32, "patch_size": 4})
    decoder = build_decoder(pretrained=False, config={
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": hidden * 8 // 3 // 64 * 64 + 64,
        "num_hidden_layers": layers, "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64,
        "max_position_embeddings": 1024, "vocab_size": VOCAB})
    projector = MLPProjector(in_dim=encoder.hidden_size, out_dim=hidden)
    return VisionLanguageModel(encoder, projector, decoder, image_token_id=IMAGE_TOKEN).eval()


def make_batch(model: VisionLanguageModel, batch: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts: text, an image's tokens, text; row i is i % 8 tokens shorter."""
    generator = torch.Generator().manual_seed(batch)
    rows = []
    for i in range(batch):
        before = torch.randint(1, VOCAB - 1, (16 - i % 8,), generator=generator)
        after = torch.randint(1, VOCAB - 1, (16,), generator=generator)
        rows.append(torch.cat([before, torch.full((model.tokens_per_image,), IMAGE_TOKEN), after]))
    length = max(len(r) for r in rows)
    ids = torch.full((batch, length), PAD)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :], mask[i, length - len(row) :] = row, 1
    pixels = torch.randn(batch, 3, 32, 32, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def exported_llava(model: VisionLanguageModel, directory: str):
    """`model` written as a transformers Llava directory and loaded back by transformers."""
    from transformers import LlavaForConditionalGeneration

    from vlm.interop.llava import to_llava

    to_llava(model).save_pretrained(directory, save_original_format=False)
    return LlavaForConditionalGeneration.from_pretrained(directory).eval()


def methods(model: VisionLanguageModel, batch: dict[str, torch.Tensor], new: int,
            llava: torch.nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    args = (model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])

    def hf() -> torch.Tensor:
        with torch.no_grad():
            return model.decoder.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                          max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                          eos_token_id=None, pad_token_id=PAD)

    def hf_llava() -> torch.Tensor:
        with torch.no_grad():
            out = llava.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 eos_token_id=None, pad_token_id=PAD)
        return out[:, batch["input_ids"].shape[1]:]

    return {
        "cache": lambda: generate(*args, max_new_tokens=new, use_cache=True),
        "recompute": lambda: generate(*args, max_new_tokens=new, use_cache=False),
        "hf_generate": hf,
        "hf_llava": hf_llava,
    }


def measure(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--recompute-rounds", type=int, default=1,
                        help="rounds for the slow recompute baseline (it takes most of the run time)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.hidden, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        llava = exported_llava(model, tmp)
    params = sum(p.numel() for p in model.decoder.parameters()) / 1e6
    print(f"decoder: Llama hidden {args.hidden}, {args.layers} layers, vocab {VOCAB} ({params:.1f}M parameters); "
          f"{model.tokens_per_image} image tokens; {args.new_tokens} new tokens; torch threads "
          f"{torch.get_num_threads()}\n")
    print(f"{'batch':>5}  {'method':<12} {'best s':>8} {'median s':>9} {'tokens/s (best)':>16}")
    summary = []
    for batch_size in args.batch_sizes:
        batch = make_batch(model, batch_size)
        runs = methods(model, batch, args.new_tokens, llava)
        for fn in runs.values():  # warm-up (first-call costs) and the equality check
            fn() if fn is not runs["recompute"] else None
        times: dict[str, list[float]] = {name: [] for name in runs}
        outputs: dict[str, torch.Tensor] = {}
        for r in range(args.rounds):
            for name, fn in runs.items():
                if name == "recompute" and r >= args.recompute_rounds:
                    continue
                seconds, outputs[name] = measure(fn)
                times[name].append(seconds)
        same = all(torch.equal(outputs["cache"], o) for o in outputs.values())
        rate = {}
        for name, values in times.items():
            best, median = min(values), statistics.median(values)
            rate[name] = batch_size * args.new_tokens / best
            print(f"{batch_size:>5}  {name:<12} {best:>8.3f} {median:>9.3f} {rate[name]:>16.1f}")
        summary.append((batch_size, rate["cache"] / rate["recompute"], rate["cache"] / rate["hf_generate"],
                        rate["cache"] / rate["hf_llava"], same))
    print()
    for batch_size, vs_recompute, vs_hf, vs_llava, same in summary:
        print(f"batch {batch_size}: cache / recompute = {vs_recompute:.2f}x (target >= 3x at batch 1); "
              f"cache / hf generate = {vs_hf:.2f}x (target >= 0.9x); cache / exported Llava generate = "
              f"{vs_llava:.2f}x; identical tokens: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
