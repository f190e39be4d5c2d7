"""The `pope` task (POPE, Li et al. 2023): does the model claim objects that are not in the picture?

Yes/no questions "is there a X in the image?" about objects present (answer yes) and absent (answer no), the
absent ones drawn at random, among the most frequent objects (popular) or among those likely to be confused with
what is there (adversarial). Questions come from webdataset shards (an image plus `json` holding a `pope` list of
{question, answer, category}) or a JSONL file (`id`, `question`, `image` path, `answer` yes|no, `category`).

A reply counts as "no" when it holds the word no or not, else as "yes" (POPE's own rule). Outputs, "yes" being
the positive class: `pope/accuracy`, `pope/precision`, `pope/recall`, `pope/f1`, `pope/yes_ratio` (the share
answered yes; 0.5 for a balanced set answered perfectly), the same per category (`pope/f1_adversarial`, ...),
and `pope/unclear` (the share of replies holding neither yes nor no, counted as yes by the rule).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from vlm.evaluation.task import Task

NEGATIONS = ("no", "not")


def _words(reply: str) -> list[str]:
    return re.findall(r"[a-z']+", reply.lower())


def _negated(words: list[str]) -> bool:
    return any(w in NEGATIONS or w.endswith("n't") for w in words)


def yes_or_no(reply: str) -> str:
    """POPE's rule: "no" if the reply holds the word no or not (or a -n't), else "yes"."""
    return "no" if _negated(_words(reply)) else "yes"


def binary_metrics(predicted: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" positive) and the yes-ratio of yes/no answers."""
    pairs = list(zip(predicted, truth))
    if not pairs:
        raise ValueError("no questions to score")
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    tn = sum(p == "no" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / len(pairs)}


def _truth(item: dict[str, Any]) -> str:
    value = item.get("answer", item.get("label"))
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    answer = str(value).strip().lower() if value is not None else ""
    if answer not in ("yes", "no"):
        raise ValueError(f"POPE item {item.get('id')!r}: the answer must be yes or no, got {value!r}")
    return answer


def score(predictions: Sequence[dict[str, Any]]) -> dict[str, float]:
    """POPE's metrics over all questions and per category; sets `score` (1 right, 0 wrong) on each prediction."""
    by_category: dict[str, list[tuple[str, str]]] = defaultdict(list)
    predicted, truth, unclear = [], [], 0
    for p in predictions:
        answer, expected = yes_or_no(p["prediction"]), _truth(p)
        p["score"] = float(answer == expected)
        predicted.append(answer)
        truth.append(expected)
        words = _words(p["prediction"])
        unclear += "yes" not in words and not _negated(words)
        if p.get("category"):
            by_category[str(p["category"])].append((answer, expected))
    metrics = {f"pope/{k}": v for k, v in binary_metrics(predicted, truth).items()}
    metrics["pope/unclear"] = unclear / len(predicted)
    metrics["pope/count"] = float(len(predicted))
    for category, pairs in sorted(by_category.items()):
        for k, v in binary_metrics([a for a, _ in pairs], [t for _, t in pairs]).items():
            metrics[f"pope/{k}_{category}"] = v
    return metrics


class POPETask(Task):
    """Ask every yes/no question (greedy, batched) and score the answers the POPE way."""

    name = "pope"
    pass_mark = 1.0

    def __init__(self, data: str | Sequence[str] | None = None, limit: int | None = None, batch_size: int = 32,
                 max_new_tokens: int = 4, prompt: str = "<image>\n{question}",
                 categories: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(data, limit, batch_size, max_new_tokens, prompt, **kwargs)
        self.categories = set(categories) if categories else None

    def items(self) -> Iterator[dict[str, Any]]:
        for item in super().items():
            if self.categories is None or item.get("category") in self.categories:
                yield item

    def items_from_sample(self, sample: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for i, q in enumerate((sample.get("json") or {}).get("pope") or []):
            yield {"id": f"{sample['__key__']}/{i}", "question": q["question"], "answer": _truth(q),
                   "references": [_truth(q)], "category": q.get("category"), "image": sample.get("image")}

    def item_from_row(self, row: dict[str, Any]) -> dict[str, Any]:
        answer = _truth(row)
        return {"id": row.get("id"), "question": row.get("question", ""), "answer": answer, "references": [answer],
                "category": row.get("category"), "image": row.get("image")}

    def score(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        return score(predictions)
