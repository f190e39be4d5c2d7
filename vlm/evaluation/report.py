"""What an evaluation leaves behind besides its metrics: `predictions.jsonl` and a picture of sample answers.

The picture is for a person skimming a run: a grid of images, each with its question, the model's prediction
(green when it passes the task's mark, red when not) and the reference answer.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from vlm.evaluation.sources import load_image

FIRST_FIELDS = ("id", "question", "prediction", "references", "score")
GREEN, RED, GREY, BLACK = (20, 140, 40), (200, 30, 30), (110, 110, 110), (0, 0, 0)


def write_predictions(predictions: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One JSON object a line: id, question, prediction, references, score first, then the task's extra fields.

    In-memory images are dropped; an image given as a path is kept, so the file can be scored (and drawn) again.
    """
    path = Path(path)
    with open(path, "w") as f:
        for p in predictions:
            row = {k: p.get(k) for k in FIRST_FIELDS}
            row.update({k: v for k, v in p.items() if k not in row and k != "image" and not k.startswith("_")})
            if isinstance(p.get("image"), str):
                row["image"] = p["image"]
            f.write(json.dumps(row) + "\n")
    return path


def load_font(size: int) -> ImageFont.ImageFont:
    """Pillow's default font at `size` px (its fixed bitmap font where Pillow lacks FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _clip(text: str, width: int, lines: int) -> list[str]:
    wrapped = textwrap.wrap(" ".join(str(text).split()), width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: max(0, width - 1)] + "…"
    return wrapped


def draw_grid(
    predictions: Sequence[dict[str, Any]],
    path: str | Path,
    passed: Callable[[dict[str, Any]], bool],
    answer: Callable[[dict[str, Any]], str] = lambda p: " | ".join(p.get("references") or []),
    columns: int = 4,
    cell: int = 224,
) -> Path:
    """A PNG grid: image, then `Q:` question, `P:` prediction (green if `passed(p)`, else red), `A:` answer."""
    font = load_font(13)
    chars = max(12, cell // 7)
    line_height, text_lines = 16, 7
    rows = max(1, -(-len(predictions) // columns))
    width, height = columns * cell, rows * (cell + text_lines * line_height + 8)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for n, p in enumerate(predictions):
        x, y = (n % columns) * cell, (n // columns) * (cell + text_lines * line_height + 8)
        try:
            image = load_image(p.get("image"))
            missing = "(no image)"
        except (OSError, ValueError, Image.DecompressionBombError):  # a path that is gone, or no image: a gap
            image, missing = None, "(image not found)"
        if image is None:
            draw.rectangle((x + 4, y + 4, x + cell - 4, y + cell - 4), fill=(225, 225, 225))
            draw.text((x + 12, y + cell // 2), missing, fill=GREY, font=font)
        else:
            thumb = image.convert("RGB").resize((cell - 8, cell - 8), Image.Resampling.BICUBIC)
            canvas.paste(thumb, (x + 4, y + 4))
        ty = y + cell
        colour = GREEN if passed(p) else RED
        blocks = [("Q: ", p.get("question") or "", BLACK, 3), ("P: ", p.get("prediction") or "", colour, 2),
                  ("A: ", answer(p), GREY, 2)]
        for prefix, text, fill, max_lines in blocks:
            for line in _clip(prefix + str(text), chars, max_lines):
                draw.text((x + 6, ty), line, fill=fill, font=font)
                ty += line_height
    path = Path(path)
    canvas.save(path)
    return path
