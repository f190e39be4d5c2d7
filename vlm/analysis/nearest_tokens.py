"""Did the image turn into words? Each projected image token -> the vocabulary entry nearest to it.

    python -m vlm.analysis.nearest_tokens model_dir=PATH image=PATH [out=nearest_tokens.png] [top=20]
                                          [device=auto] [dtype=auto]

The GIT-LLM article's experiment: after the projector, image tokens live in the decoder's input-embedding space,
so each can be compared (cosine similarity) with every token embedding. The tool prints the most frequent nearest
tokens with counts and writes a PNG with each word drawn over the image at its patch position. A tiled model
(`max_tiles > 1`) sees the picture as it was trained to: every tile's words are drawn at the tile's place, and the
thumbnail's words in a second panel. Special tokens (`<image>`, chat markers, padding) are left out of the search
unless `include_special=true`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn

from vlm.evaluation.report import load_font


@dataclass
class NearestTokens:
    """One entry per image token, row-major over `grid`; `prefix` holds the tokens of non-patch features (CLS).

    Tiled: `tiles` holds one result per tile (row-major over `tile_grid`) and `thumbnail` the global view's; the
    top-level lists then hold every tile's tokens followed by the thumbnail's.
    """

    tokens: list[str]
    ids: list[int]
    similarity: list[float]
    grid: tuple[int, int]
    prefix: list[str] = field(default_factory=list)
    tile_grid: tuple[int, int] = (1, 1)
    tiles: list[NearestTokens] = field(default_factory=list)
    thumbnail: NearestTokens | None = None

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
    """The nearest vocabulary entry (cosine similarity to its input embedding) of each projected image token, for
    every tile the model's own transform makes of the image (`max_tiles` of its config) and the thumbnail."""
    from vlm.data.images import ImageTransform

    encoder = model.encoder
    max_tiles = int((getattr(model, "config", None) or {}).get("max_tiles", 1))
    transform = ImageTransform(encoder.image_size, encoder.image_mean, encoder.image_std, max_tiles=max_tiles)
    pixels, tile_grid = transform(image.convert("RGB"))
    pixels = pixels.to(next(model.parameters()).device)
    features = model.encode_images(pixels).float()  # (tiles, T', D)
    table = model.decoder.get_input_embeddings().weight[: len(tokenizer)].float()  # rows past the tokenizer: padding
    table = nn.functional.normalize(table, dim=-1)
    excluded = []
    if not include_special:
        excluded = [i for i in tokenizer.all_special_ids if i < len(tokenizer)]
        excluded = sorted(set(excluded + [i for i in tokenizer.get_added_vocab().values() if i < len(tokenizer)]))
    rows, cols, prefix = token_grid(features.shape[1], encoder.grid)
    views = []
    for tile in features:
        similarity = nn.functional.normalize(tile, dim=-1) @ table.T
        similarity[:, excluded] = float("-inf")
        best, ids = similarity.max(dim=-1)
        words = [_display(tokenizer, int(i)) for i in ids]
        views.append(NearestTokens(tokens=words[prefix:], ids=ids[prefix:].tolist(),
                                   similarity=best[prefix:].tolist(), grid=(rows, cols), prefix=words[:prefix]))
    if len(views) == 1:
        return views[0]
    return NearestTokens(tokens=[w for v in views for w in v.tokens], ids=[i for v in views for i in v.ids],
                         similarity=[x for v in views for x in v.similarity], grid=(rows, cols),
                         prefix=[w for v in views for w in v.prefix], tile_grid=tuple(tile_grid),
                         tiles=views[:-1], thumbnail=views[-1])


def draw_words(image: Image.Image, result: NearestTokens, path: str | Path, size: int = 768) -> Path:
    """The image, enlarged, with a light grid and each patch's nearest word written in its cell. Tiled: each
    tile's words over its part of the picture (a stronger line between tiles), the thumbnail's beside it."""
    canvas = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).convert("RGBA")
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    if not result.tiles:
        _draw_cells(draw, result, 0.0, 0.0, float(size), float(size))
        path = Path(path)
        Image.alpha_composite(canvas, overlay).convert("RGB").save(path)
        return path
    t_rows, t_cols = result.tile_grid
    tile_w, tile_h = size / t_cols, size / t_rows
    for n, tile in enumerate(result.tiles):
        r, c = divmod(n, t_cols)
        _draw_cells(draw, tile, c * tile_w, r * tile_h, tile_w, tile_h)
        draw.rectangle((c * tile_w, r * tile_h, (c + 1) * tile_w, (r + 1) * tile_h), outline=(255, 60, 60, 220),
                       width=3)
    tiled = Image.alpha_composite(canvas, overlay)
    thumb = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).convert("RGBA")
    thumb_overlay = Image.new("RGBA", thumb.size, (0, 0, 0, 0))
    if result.thumbnail is not None:
        _draw_cells(ImageDraw.Draw(thumb_overlay), result.thumbnail, 0.0, 0.0, float(size), float(size))
    both = Image.new("RGB", (2 * size + 16, size), (255, 255, 255))
    both.paste(tiled.convert("RGB"), (0, 0))
    both.paste(Image.alpha_composite(thumb, thumb_overlay).convert("RGB"), (size + 16, 0))
    path = Path(path)
    both.save(path)
    return path


def _draw_cells(draw: ImageDraw.ImageDraw, result: NearestTokens, left: float, top: float, width: float,
                height: float) -> None:
    """`result`'s words in a rows x cols grid of cells over the box (left, top, width, height)."""
    rows, cols = result.grid
    cell_w, cell_h = width / cols, height / rows
    font = load_font(max(8, min(18, int(cell_h / 2.5))))
    for n, word in enumerate(result.tokens):
        r, c = divmod(n, cols)
        x0, y0 = left + c * cell_w, top + r * cell_h
        draw.rectangle((x0, y0, x0 + cell_w, y0 + cell_h), outline=(255, 255, 255, 90))
        text = word[: max(2, int(cell_w // 7))]
        text_left, text_top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tx, ty = x0 + (cell_w - (right - text_left)) / 2, y0 + (cell_h - (bottom - text_top)) / 2
        draw.rectangle((tx - 2, ty - 1, tx + right - text_left + 2, ty + bottom - text_top + 3),
                       fill=(255, 255, 255, 170))
        draw.text((tx - text_left, ty - text_top), text, fill=(0, 0, 0, 255), font=font)


def main(argv: Sequence[str] | None = None) -> NearestTokens:
    from vlm.cli import REQUIRED, parse_options
    from vlm.device import place
    from vlm.models.vlm import VisionLanguageModel

    options = parse_options(argv, "vlm.analysis.nearest_tokens", {
        "model_dir": REQUIRED, "image": REQUIRED, "out": "nearest_tokens.png", "top": 20, "include_special": False,
        "device": "auto", "dtype": "auto", "trust_remote_code": False})
    model, tokenizer = VisionLanguageModel.from_pretrained(options["model_dir"],
                                                           trust_remote_code=options["trust_remote_code"])
    model = place(model, options["device"], options["dtype"])
    with Image.open(options["image"]) as opened:
        image = opened.convert("RGB")
    result = nearest_tokens(model.eval(), tokenizer, image, options["include_special"])
    out = draw_words(image, result, options["out"])
    rows, cols = result.grid
    if result.tiles:
        t_rows, t_cols = result.tile_grid
        print(f"{t_rows}x{t_cols} tiles + a thumbnail, {rows}x{cols} image tokens each ({len(result.tokens)} in all); "
              "most frequent nearest tokens:")
    else:
        print(f"{rows}x{cols} image tokens; most frequent nearest tokens:")
    for word, count in result.most_common(options["top"]):
        print(f"  {count:5d}  {word!r}")
    print(f"mean cosine similarity {sum(result.similarity) / len(result.similarity):.3f}; picture: {out}")
    return result


if __name__ == "__main__":
    main()
