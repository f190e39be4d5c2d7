"""The `vqa` task: answer questions about images with the model, or score a file of predictions from any model.

Questions come from webdataset shards (an image plus `json` holding a `qa` list of {question, answer(s), type},
or a single `question` with `answers`) or from a JSONL file (`id`, `question`, `image` path, `answers`, optional
`question_type`). Outputs: `vqa/accuracy` (VQAv2), `vqa/exact_match`, and `vqa/accuracy_<type>` per question type.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from vlm.evaluation.sources import reference_list
from vlm.evaluation.task import Task
from vlm.evaluation.vqa_metric import exact_match, vqa_accuracy


def _answers(item: dict[str, Any]) -> list[str]:
    return reference_list(item, ("answers", "references", "answer"))


def score(predictions: Sequence[dict[str, Any]]) -> dict[str, float]:
    """VQAv2 accuracy and exact match, overall and per question type. Adds `score` to each prediction.

    References are read from `references` (or `answers`, as in a predictions file).
    """
    by_type: dict[str, list[float]] = defaultdict(list)
    total, exact = [], []
    for p in predictions:
        references = p.get("references") or _answers(p)
        p["score"] = vqa_accuracy(p["prediction"], references)
        total.append(p["score"])
        exact.append(exact_match(p["prediction"], references))
        if p.get("question_type"):
            by_type[p["question_type"]].append(p["score"])
    if not total:
        raise ValueError("no questions to score")
    metrics = {"vqa/accuracy": sum(total) / len(total), "vqa/exact_match": sum(exact) / len(exact),
               "vqa/count": float(len(total))}
    for kind, scores in sorted(by_type.items()):
        metrics[f"vqa/accuracy_{kind}"] = sum(scores) / len(scores)
    return metrics


class VQATask(Task):
    """Generate a short answer for every question (greedy, KV cache, batched) and score it the VQAv2 way."""

    name = "vqa"
    pass_mark = 0.5  # VQAv2 partial credit: two of ten annotators agreeing already gives 0.6

    def __init__(self, data: str | Sequence[str] | None = None, limit: int | None = None, batch_size: int = 32,
                 max_new_tokens: int = 10, prompt: str = "<image>\n{question}", **kwargs: Any) -> None:
        super().__init__(data, limit, batch_size, max_new_tokens, prompt, **kwargs)

    def items_from_sample(self, sample: dict[str, Any]) -> Iterator[dict[str, Any]]:
        meta = sample.get("json") or {}
        questions = meta.get("qa") or ([meta] if "question" in meta else [])
        for i, qa in enumerate(questions):
            yield {"id": f"{sample['__key__']}/{i}", "question": qa["question"], "references": _answers(qa),
                   "question_type": qa.get("type", qa.get("question_type")), "image": sample.get("image")}

    def item_from_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"id": row.get("id"), "question": row.get("question", ""), "references": _answers(row),
                "question_type": row.get("question_type"), "image": row.get("image")}

    def score(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        return score(predictions)
