"""The `caption` task: describe each image, score with BLEU-1..4 and CIDEr-D against all its references.

Items: shard samples (references from json `captions`, else json `caption`, else `txt`) or JSONL rows (`id`,
`image`, references in `captions`, `references` or `answers`). A prediction's `score` is its own CIDEr-D (with the
document frequencies of the whole set), so the picture and predictions.jsonl show which captions carried the
corpus score.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from vlm.evaluation.caption_metric import caption_scores
from vlm.evaluation.sources import reference_list
from vlm.evaluation.task import Task

DEFAULT_QUESTION = "Describe the image."


class CaptionTask(Task):
    """Generate a caption per image (the `prompt` is the user turn; `{question}` is `question`)."""

    name = "caption"
    pass_mark = 1.0  # per-caption CIDEr-D: around 1 and above is a caption close to its references

    def __init__(self, data: str | Sequence[str] | None = None, limit: int | None = None, batch_size: int = 32,
                 max_new_tokens: int = 32, prompt: str = "<image>\n{question}", question: str = DEFAULT_QUESTION,
                 **kwargs: Any) -> None:
        super().__init__(data, limit, batch_size, max_new_tokens, prompt, **kwargs)
        self.question = question

    def item_from_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"id": row.get("id"), "question": row.get("question") or self.question,
                "references": reference_list(row, ("captions", "references", "answers", "caption")),
                "image": row.get("image")}

    def items_from_sample(self, sample: dict[str, Any]) -> Iterator[dict[str, Any]]:
        meta = sample.get("json") if isinstance(sample.get("json"), dict) else {}
        references = meta.get("captions") or meta.get("caption") or sample.get("txt")
        if not references:
            raise ValueError(f"sample {sample.get('__key__')!r} has no caption (json captions/caption or txt)")
        yield {"id": sample["__key__"], "question": self.question,
               "references": [references] if isinstance(references, str) else list(references),
               "image": sample.get("image")}

    def score(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        metrics, per_caption = caption_scores([p["prediction"] for p in predictions],
                                              [p["references"] for p in predictions])
        for p, value in zip(predictions, per_caption):
            p["score"] = value
        out = {f"caption/{k}": v for k, v in metrics.items()}
        out["caption/count"] = float(len(predictions))
        return out
