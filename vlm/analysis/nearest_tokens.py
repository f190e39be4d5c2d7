"""Did the image turn into words? Each projected image token -> the vocabulary entry nearest to it.

    python -m vlm.analysis.nearest_tokens model_dir=PATH image=PATH [out=nearest_tokens.png] [top=20]
                                          [device=auto] [dtype=auto]

The GIT-LLM article's experiment: after the projector, image tokens live in the decoder's input-embedding space,
so each can be compared (cosine similarity) with every token embedding. The tool prints the most frequent nearest
tokens with counts and writes a PNG with each word drawn over the image at its patch position. Special tokens
(`<image>`, chat markers, padding) are left out of the search unless `include_special=true`.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn

from vlm.evaluation.report import _font


@dataclass
class NearestTokens:
    """One entry per image patch, row-major over `grid`; `prefix` holds the tokens of non-patch features (CLS)."""

    tokens: list[str]
    ids: list[int]
    similarity: list[float]
    grid: tuple[int, int]
    prefix: list[str] = field(default_factory=list)

    def most_common(self, n: int = 20) -> list[tuple[str, int]]:
        return Counter(self.tokens).most_common(n)


def token_grid(n_tokens: int, patch_grid: tuple[int, int]) -> tuple[int, int, int]:
    """(rows, cols, prefix) of `n_tokens` projected tokens from an encoder with `patch_grid` patches.

    As many tokens as patches: one per patch. More: leading prefix tokens (CLS, registers). Fewer: the projector
    merged s x s patches (pixel shuffle), so the grid shrinks by s on each side.
    """
    rows, cols = patch_grid
    if n_tokens >= rows * cols:
        return rows, cols, n_tokens - rows * cols
    factor = round((rows * cols / n_tokens) ** 0.5)
    if factor * factor * n_tokens != rows * cols or rows % factor or cols % factor:
        raise ValueError(f"{n_tokens} image tokens do not form a grid over {rows}x{cols} patches")
    return rows // factor, cols // factor, 0


def _display(tokenizer: Any, token_id: int) -> str:
    text = tokenizer.decode([token_id]).strip()
    return text or str(tokenizer.convert_ids_to_tokens(token_id))


@torch.no_grad()
def nearest_tokens(model: nn.Module, tokenizer: Any, image: Image.Image,
                   include_special: bool = False) -> NearestTokens:
    """The nearest vocabulary entry (cosine similarity to its input embedding) of each projected image token."""
    from vlm.data.images import ImageTransform

    encoder = model.encoder
    transform = ImageTransform(encoder.image_size, encoder.image_mean, encoder.image_std, max_tiles=1)
    pixels, _ = transform(image.convert("RGB"))
    pixels = pixels.to(next(model.parameters()).device)
    features = model.encode_images(pixels)[0].float()  # (T', D)
    table = model.decoder.get_input_embeddings().weight[: len(tokenizer)].float()  # rows past the tokenizer: padding
    similarity = nn.functional.normalize(features, dim=-1) @ nn.functional.normalize(table, dim=-1).T
    if not include_special:
        special = [i for i in tokenizer.all_special_ids if i < len(tokenizer)]
        special += [i for i in tokenizer.get_added_vocab().values() if i < len(tokenizer)]
        similarity[:, sorted(set(special))] = float("-inf")
    best, ids = similarity.max(dim=-1)
    rows, cols, prefix = token_grid(features.shape[0], encoder.grid)
    words = [_display(tokenizer, int(i)) for i in ids]
    return NearestTokens(tokens=words[prefix:], ids=ids[prefix:].tolist(), similarity=best[prefix:].tolist(),
                         grid=(rows, cols), prefix=words[:prefix])


def draw_words(image: Image.Image, result: NearestTokens, path: str | Path, size: int = 768) -> Path:
    """The image, enlarged, with a light grid and each patch's nearest word written in its cell."""
    rows, cols = result.grid
    canvas = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).convert("RGBA")
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    cell_w, cell_h = size / cols, size / rows
    font = _font(max(8, min(18, int(cell_h / 2.5))))
    for n, word in enumerate(result.tokens):
        r, c = divmod(n, cols)
        x0, y0 = c * cell_w, r * cell_h
        draw.rectangle((x0, y0, x0 + cell_w, y0 + cell_h), outline=(255, 255, 255, 90))
        text = word[: max(2, int(cell_w // 7))]
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tx, ty = x0 + (cell_w - (right - left)) / 2, y0 + (cell_h - (bottom - top)) / 2
        draw.rectangle((tx - 2, ty - 1, tx + right - left + 2, ty + bottom - top + 3), fill=(255, 255, 255, 170))
        draw.text((tx - left, ty - top), text, fill=(0, 0, 0, 255), font=font)
    path = Path(path)
    Image.alpha_composite(canvas, overlay).convert("RGB").save(path)
    return path


def main(argv: Sequence[str] | None = None) -> NearestTokens:
    from omegaconf import OmegaConf

    from vlm.device import place
    from vlm.models.vlm import VisionLanguageModel

    options = OmegaConf.to_container(OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv)))
    if not options.get("model_dir") or not options.get("image"):
        raise SystemExit("usage: python -m vlm.analysis.nearest_tokens model_dir=PATH image=PATH "
                         "[out=nearest_tokens.png] [top=20] [include_special=false] [device=auto] [dtype=auto]")
    model, tokenizer = VisionLanguageModel.from_pretrained(
        options["model_dir"], trust_remote_code=bool(options.get("trust_remote_code", False)))
    model = place(model, options.get("device", "auto"), options.get("dtype", "auto"))
    with Image.open(options["image"]) as opened:
        image = opened.convert("RGB")
    result = nearest_tokens(model.eval(), tokenizer, image, bool(options.get("include_special", False)))
    out = draw_words(image, result, options.get("out", "nearest_tokens.png"))
    rows, cols = result.grid
    print(f"{rows}x{cols} image tokens; most frequent nearest tokens:")
    for word, count in result.most_common(int(options.get("top", 20))):
        print(f"  {count:5d}  {word!r}")
    print(f"mean cosine similarity {sum(result.similarity) / len(result.similarity):.3f}; picture: {out}")
    return result


if __name__ == "__main__":
    main()
