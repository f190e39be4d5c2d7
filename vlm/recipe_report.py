"""What a recipe leaves at its end: `curves.png` (every stage's training and validation loss, from its CSV log)
and a summary table (stage, steps, image size, wall time, final losses; then each metric beside its chance level;
then where the outputs are).

Everything here is read back from what the stages wrote (`<stage>/logs/metrics.csv`, `<stage>/config.yaml`,
`eval/<task>/predictions.jsonl`), so the report shows the logged numbers and nothing else. A stage without a CSV
log (`logger=none` or `logger=wandb`) is listed without losses and left out of the picture.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

TRAIN_KEY, VAL_KEY = "train/loss", "val/loss"
BLUE, ORANGE, GREY, BLACK = (31, 119, 180), (255, 127, 14), (150, 150, 150), (0, 0, 0)


@dataclass
class StageReport:
    name: str
    seconds: float
    steps: int | None = None
    image_size: str = "-"
    train: list[tuple[int, float]] = field(default_factory=list)  # (step, train/loss)
    val: list[tuple[int, float]] = field(default_factory=list)  # (step, val/loss)

    @property
    def final_train(self) -> float | None:
        return self.train[-1][1] if self.train else None

    @property
    def final_val(self) -> float | None:
        return self.val[-1][1] if self.val else None


def read_metrics_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _series(rows: Sequence[Mapping[str, str]], key: str) -> list[tuple[int, float]]:
    out = []
    for row in rows:
        value, step = row.get(key), row.get("step")
        if value not in (None, "") and step not in (None, ""):
            out.append((int(float(step)), float(value)))
    return out


def stage_resolution(config: Mapping[str, Any]) -> tuple[list[int], int]:
    """(the encoder's input sizes in order - one, or several under a within-stage schedule -, tiles per side).

    A tiled model (`max_tiles` > 1) sees a picture as a grid of tiles of the encoder's size: 2x2 tiles of 32 px
    resolve the picture at 64 px."""
    schedule = ((config.get("data") or {}).get("resolution_schedule")) or None
    if schedule:
        sizes = [int(size) for _, size in sorted((int(step), size) for step, size in dict(schedule).items())]
    else:
        size = ((config.get("model") or {}).get("encoder") or {}).get("image_size")
        sizes = [int(size)] if size is not None else []
    side = max(1, math.isqrt(int((config.get("model") or {}).get("max_tiles") or 1)))
    return list(dict.fromkeys(sizes)), side


def stage_image_size(config: Mapping[str, Any]) -> str:
    """`32`, `16->32` under a within-stage schedule, `2x2 tiles of 32` for a tiled model."""
    sizes, side = stage_resolution(config)
    if not sizes:
        return "-"
    text = "->".join(str(s) for s in sizes)
    return f"{side}x{side} tiles of {text}" if side > 1 else text


def stage_report(name: str, stage_dir: Path, seconds: float) -> StageReport:
    import yaml

    report = StageReport(name, seconds)
    config_path = stage_dir / "config.yaml"
    if config_path.is_file():
        config = yaml.safe_load(config_path.read_text()) or {}
        report.image_size = stage_image_size(config)
        if (config.get("stage") or {}).get("data_format") == "text":
            report.image_size = "(no images)"
    rows = read_metrics_csv(stage_dir / "logs" / "metrics.csv")
    report.train, report.val = _series(rows, TRAIN_KEY), _series(rows, VAL_KEY)
    steps = [int(float(r["step"])) for r in rows if r.get("step") not in (None, "")]
    report.steps = max(steps) + 1 if steps else None
    return report


# ---- chance levels ---------------------------------------------------------------------------------------------
def chance_levels(eval_dir: Path) -> dict[str, float]:
    """Chance for each metric an evaluation reports, from its predictions: a uniform guess among the answers that
    questions of the same type have in the test data (`vqa/accuracy_<type>`, and `vqa/accuracy` as the average
    over the questions), or among the classes (`<task>/top1`; `top5` = 5 / classes)."""
    chances: dict[str, float] = {}
    for task_dir in sorted(p for p in eval_dir.iterdir() if p.is_dir()) if eval_dir.is_dir() else []:
        path = task_dir / "predictions.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        task = task_dir.name
        if rows and "question_type" in rows[0]:
            answers: dict[str, set[str]] = defaultdict(set)
            for row in rows:
                answers[row.get("question_type") or ""].update(str(a) for a in row.get("references") or [])
            per_row = [1 / max(1, len(answers[row.get("question_type") or ""])) for row in rows]
            chances[f"{task}/accuracy"] = sum(per_row) / len(per_row)
            for kind, values in answers.items():
                if kind:
                    chances[f"{task}/accuracy_{kind}"] = 1 / max(1, len(values))
        elif rows:
            classes = {str(r.get("label") if r.get("label") is not None else (r.get("references") or [None])[0])
                       for r in rows}
            chances[f"{task}/top1"] = 1 / max(1, len(classes))
            chances[f"{task}/top5"] = min(1.0, 5 / max(1, len(classes)))
    return chances


# ---- the picture -----------------------------------------------------------------------------------------------
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def draw_curves(stages: Sequence[StageReport], path: Path, panel: tuple[int, int] = (420, 280)) -> Path | None:
    """One panel per stage with a CSV log: training loss (blue line) and validation loss (orange dots), loss on a
    log scale against the optimizer step. Returns None when no stage logged a loss."""
    drawn = [s for s in stages if s.train or s.val]
    if not drawn:
        return None
    width, height = panel
    columns = min(2, len(drawn))
    rows = -(-len(drawn) // columns)
    canvas = Image.new("RGB", (columns * width, rows * height), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(11)
    for n, stage in enumerate(drawn):
        x0, y0 = (n % columns) * width, (n // columns) * height
        left, top, right, bottom = x0 + 56, y0 + 30, x0 + width - 14, y0 + height - 34
        values = [v for _, v in stage.train + stage.val if v > 0 and math.isfinite(v)]
        steps = [s for s, _ in stage.train + stage.val]
        draw.text((x0 + 8, y0 + 6), f"{stage.name}  ({stage.steps or '?'} steps, image {stage.image_size})",
                  fill=BLACK, font=font)
        draw.rectangle((left, top, right, bottom), outline=GREY)
        if not values:
            continue
        low, high = math.log10(min(values)), math.log10(max(values))
        if high - low < 1e-6:
            low, high = low - 0.5, high + 0.5
        last = max(max(steps), 1)

        def xy(step: int, value: float) -> tuple[float, float]:
            v = math.log10(max(value, 10 ** low))
            return (left + (right - left) * step / last, bottom - (bottom - top) * (v - low) / (high - low))

        for fraction in (0.0, 0.5, 1.0):
            value = 10 ** (low + fraction * (high - low))
            y = bottom - (bottom - top) * fraction
            draw.line((left - 4, y, left, y), fill=GREY)
            draw.text((x0 + 4, y - 6), f"{value:.3g}", fill=GREY, font=small)
        draw.text((left, bottom + 4), "0", fill=GREY, font=small)
        draw.text((right - 40, bottom + 4), f"step {last}", fill=GREY, font=small)
        points = [xy(s, v) for s, v in stage.train if v > 0 and math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=BLUE, width=2)
        elif points:
            draw.ellipse((points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2), fill=BLUE)
        for s, v in stage.val:
            if v > 0 and math.isfinite(v):
                px, py = xy(s, v)
                draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=ORANGE)
        draw.text((right - 150, top + 4), "train/loss", fill=BLUE, font=small)
        draw.text((right - 80, top + 4), "val/loss", fill=ORANGE, font=small)
    path = Path(path)
    canvas.save(path)
    return path


# ---- the table -------------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def format_value(key: str, value: Any) -> str:
    """Counts as integers, rates with four decimals."""
    if isinstance(value, float) and value.is_integer() and key.rsplit("/", 1)[-1] in ("count", "n", "samples"):
        return str(int(value))
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_summary(stages: Sequence[StageReport], metrics: Mapping[str, Any], chances: Mapping[str, float],
                   locations: Mapping[str, Path | str], total_seconds: float | None = None) -> str:
    header = ("stage", "steps", "image px", "wall time", "train loss", "val loss")
    body = [(s.name, str(s.steps or "-"), s.image_size, _duration(s.seconds), _fmt(s.final_train), _fmt(s.final_val))
            for s in stages]
    if total_seconds is not None:
        body.append(("total", "", "", _duration(total_seconds), "", ""))
    lines = _table(header, body)
    if metrics:
        rows = [(k, format_value(k, v), _fmt(chances.get(k)) if k in chances else "")
                for k, v in sorted(metrics.items())]
        lines += [""] + _table(("metric", "value", "chance"), rows)
    lines.append("")
    width = max(len(k) for k in locations) if locations else 0
    lines += [f"{k:<{width}}  {v}" for k, v in locations.items()]
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(header), "  ".join("-" * w for w in widths), *(line(r).rstrip() for r in rows)]


def write_recipe_report(root: Path, stage_seconds: Mapping[str, float], metrics: Mapping[str, Any],
                        total_seconds: float | None = None) -> str:
    """Draw `root/curves.png` and return the summary text (the caller prints it; it is also written to
    `root/summary.txt`)."""
    root = Path(root)
    stages = [stage_report(name, root / name, seconds) for name, seconds in stage_seconds.items()]
    curves = draw_curves(stages, root / "curves.png")
    locations: dict[str, Path | str] = {"run directory": root}
    if curves is not None:
        locations["loss curves"] = curves
    for picture in sorted((root / "eval").glob("*/predictions.png")):
        locations[f"{picture.parent.name} predictions"] = picture
    if (root / "metrics.json").is_file():
        locations["metrics"] = root / "metrics.json"
    text = format_summary(stages, metrics, chance_levels(root / "eval"), locations, total_seconds)
    (root / "summary.txt").write_text(text + "\n")
    return text
