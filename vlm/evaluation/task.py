"""The protocol every evaluation task follows, so `vlm.run.run_evaluation` can run any of them the same way.

`run(model_dir=None, predictions=None, out_dir, device="auto", dtype="auto")`: either generate predictions with a
model directory (on `device` in `dtype`, vlm.device), or read a predictions file written by any model (scoring
without a model); then score them, write `predictions.jsonl`
(id, question, prediction, references, score, plus the task's own fields) and `predictions.png` (a grid of
sample images, green or red), and return flat metrics named `<task>/<metric>`.

A task subclass says how a shard sample or a JSONL row becomes an item (`items_from_sample`, `item_from_row`),
how an item is asked (`conversation`) and how predictions are scored (`score`). An item is a dict with at least
`id`, `question`, `references` (list of strings) and `image` (PIL image, path, or None).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from vlm.evaluation.report import draw_grid, write_predictions
from vlm.evaluation.sources import is_jsonl, load_image, read_jsonl, read_jsonl_lines, read_shards

log = logging.getLogger("vlm")

# What a malformed row raises in a task's `item_from_row` (a number where a list belongs, ...)
ROW_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError)


class Task:
    """Base class: reading items, generating answers in batches, writing the outputs. Subclasses score."""

    name = "task"
    pass_mark = 0.5  # a prediction whose score reaches this is drawn green

    def __init__(
        self,
        data: str | Sequence[str] | None = None,
        limit: int | None = None,
        batch_size: int = 32,
        max_new_tokens: int = 16,
        prompt: str = "<image>\n{question}",
        num_beams: int = 1,
        picture_samples: int = 16,
    ) -> None:
        self.data = data
        self.limit = limit
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.prompt = prompt
        self.num_beams = int(num_beams)
        self.picture_samples = int(picture_samples)

    # ---- what a subclass defines -------------------------------------------------------------------------------
    def items_from_sample(self, sample: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Items of one decoded shard sample (a sample may hold several questions)."""
        raise NotImplementedError

    def item_from_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """An item (or a prediction, when the row has `prediction`) from one JSONL row."""
        raise NotImplementedError

    def score(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        """Metrics `<task>/<metric>`; sets `score` on every prediction."""
        raise NotImplementedError

    def answer_text(self, prediction: dict[str, Any]) -> str:
        """The reference as drawn in the picture."""
        return " | ".join(prediction.get("references") or [])

    # ---- asking a model ----------------------------------------------------------------------------------------
    def conversation(self, item: dict[str, Any]) -> tuple[list[dict[str, str]], list[Image.Image]]:
        """The user turn for an item: `prompt` filled with the item's fields; the image only if `<image>` is asked."""
        text = self.prompt.format(**item)
        image = load_image(item.get("image")) if "<image>" in text else None
        if "<image>" in text and image is None:
            raise ValueError(f"item {item['id']!r}: the prompt asks for <image> but the item has none")
        return [{"role": "user", "content": text}], [image] if image is not None else []

    def items(self) -> Iterator[dict[str, Any]]:
        if self.data is None:
            raise ValueError(f"task.data is not set: give shards or a .jsonl file of {self.name} items")
        if is_jsonl(self.data):
            source: Iterator[dict[str, Any]] = (self.item_from_row(row) for row in read_jsonl(self.data))
        else:
            source = (item for sample in read_shards(self.data) for item in self.items_from_sample(sample))
        for n, item in enumerate(source):
            if self.limit is not None and n >= self.limit:
                return
            yield item

    def batches(self) -> Iterator[list[dict[str, Any]]]:
        batch: list[dict[str, Any]] = []
        for item in self.items():
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def predict_batch(self, answerer: Any, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Generated answers for a batch of items (greedy unless `num_beams > 1`)."""
        replies = answerer.generate([self.conversation(it) for it in items], max_new_tokens=self.max_new_tokens,
                                    num_beams=self.num_beams)
        return [{**it, "prediction": reply} for it, reply in zip(items, replies)]

    def predict(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto",
                trust_remote_code: bool = False) -> list[dict[str, Any]]:
        """Answer every item. Only the first `picture_samples` keep their image in memory (for the picture)."""
        from tqdm.auto import tqdm

        from vlm.evaluation.answerer import Answerer

        answerer = Answerer.from_dir(model_dir, device, dtype, trust_remote_code)
        predictions: list[dict[str, Any]] = []
        # a bar on a terminal (none in log files): the total is known only with a limit
        with tqdm(total=self.limit, desc=self.name, unit="item", dynamic_ncols=True, disable=None) as bar:
            for items in self.batches():
                for p in self.predict_batch(answerer, items):
                    if len(predictions) >= self.picture_samples and not isinstance(p.get("image"), str):
                        p.pop("image", None)
                    predictions.append(p)
                bar.update(len(items))
        return predictions

    # ---- the protocol ------------------------------------------------------------------------------------------
    def read_predictions(self, path: str | Path) -> list[dict[str, Any]]:
        """The rows of a predictions file, each checked: errors name the file and line. A missing or null
        `prediction`, or an id seen before, is an error (never scored as the text "None", never counted twice)."""
        predictions = []
        first_line: dict[Any, int] = {}
        for number, row in read_jsonl_lines(path):
            where = f"{path}:{number}"
            prediction = row.get("prediction")
            if prediction is None:
                raise ValueError(f"{where}: row {row.get('id')!r} has no `prediction` (missing or null)")
            if not isinstance(prediction, (str, int, float)) or isinstance(prediction, bool):
                raise ValueError(f"{where}: `prediction` must be text, not {type(prediction).__name__}")
            try:
                item = self.item_from_row(row)
            except ROW_ERRORS as exc:
                raise ValueError(f"{where}: {exc}") from None
            ident = item.get("id")
            if ident is not None:
                try:
                    seen = first_line.setdefault(ident, number)
                except TypeError:  # an unhashable id (a list, ...)
                    raise ValueError(f"{where}: `id` must be a string or a number") from None
                if seen != number:
                    raise ValueError(f"{where}: duplicate id {ident!r} (first at line {seen})")
            predictions.append({**item, "prediction": str(prediction)})
        return predictions

    def run(self, model_dir: str | Path | None = None, predictions: str | Path | None = None,
            out_dir: str | Path = ".", device: str = "auto", dtype: str = "auto",
            trust_remote_code: bool = False) -> dict[str, float]:
        """Predict (or read predictions), score, write predictions.jsonl and predictions.png; return the metrics."""
        if predictions:
            preds = self.read_predictions(predictions)
        elif model_dir:
            preds = self.predict(model_dir, device, dtype, trust_remote_code)
        else:
            raise ValueError("give model_dir=PATH (to answer the questions) or predictions=FILE.jsonl (to score them)")
        if not preds:
            raise ValueError(f"{self.name}: nothing to score (no items)")
        metrics = self.score(preds)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_predictions(preds, out / "predictions.jsonl")
        try:  # a picture for people: it never costs the scores (an image it cannot read leaves a gap in the grid)
            draw_grid(preds[: self.picture_samples], out / "predictions.png",
                      passed=lambda p: p.get("score", 0.0) >= self.pass_mark, answer=self.answer_text)
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: could not draw %s (%s: %s); the metrics and predictions are written", self.name,
                        out / "predictions.png", type(exc).__name__, exc)
        return metrics
