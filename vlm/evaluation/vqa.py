"""The `vqa` task: answer questions about images with the model, or score a file of predictions from any model.

Questions come from webdataset shards (an image plus `json` holding a `qa` list of {question, answer(s), type},
or a single `question` with `answers`) or from a JSONL file (`id`, `question`, `image` path, `answers`, optional
`question_type`). Outputs: `vqa/accuracy` (VQAv2), `vqa/exact_match`, and `vqa/accuracy_<type>` per question type.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from vlm.evaluation.vqa_metric import exact_match, vqa_accuracy

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def _answers(item: dict[str, Any]) -> list[str]:
    answers = item.get("answers", item.get("answer"))
    if answers is None:
        raise ValueError(f"question {item.get('id')!r} has no reference answer")
    return [answers] if isinstance(answers, str) else [a["answer"] if isinstance(a, dict) else a for a in answers]


def questions_from_shards(urls: str | Sequence[str]) -> Iterator[dict[str, Any]]:
    """One item per question: id, question, answers, question_type, image (PIL)."""
    from vlm.data.pipeline import iterate_samples

    for sample in iterate_samples(urls):
        image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        meta = sample.get("json") or {}
        items = meta.get("qa") or ([meta] if "question" in meta else [])
        for i, qa in enumerate(items):
            yield {
                "id": f"{sample['__key__']}/{i}",
                "question": qa["question"],
                "answers": _answers(qa),
                "question_type": qa.get("type", qa.get("question_type")),
                "image": image,
            }


def questions_from_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    from PIL import Image

    root = Path(path).parent
    with open(path) as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                image = item.get("image")
                yield {
                    "id": item["id"],
                    "question": item["question"],
                    "answers": _answers(item),
                    "question_type": item.get("question_type"),
                    "image": Image.open(root / image).convert("RGB") if image else None,
                }


def score(predictions: Sequence[dict[str, Any]]) -> dict[str, float]:
    """VQAv2 accuracy and exact match, overall and per question type. Adds `score` to each prediction."""
    by_type: dict[str, list[float]] = defaultdict(list)
    total, exact = [], []
    for p in predictions:
        p["score"] = vqa_accuracy(p["prediction"], p["answers"])
        total.append(p["score"])
        exact.append(exact_match(p["prediction"], p["answers"]))
        if p.get("question_type"):
            by_type[p["question_type"]].append(p["score"])
    if not total:
        raise ValueError("no questions to score")
    metrics = {"vqa/accuracy": sum(total) / len(total), "vqa/exact_match": sum(exact) / len(exact),
               "vqa/count": float(len(total))}
    for kind, scores in sorted(by_type.items()):
        metrics[f"vqa/accuracy_{kind}"] = sum(scores) / len(scores)
    return metrics


class VQATask:
    """Generate an answer for every question (greedy, KV cache, batched) and score it."""

    name = "vqa"

    def __init__(
        self,
        data: str | Sequence[str] | None = None,
        limit: int | None = None,
        batch_size: int = 32,
        max_new_tokens: int = 10,
        prompt: str = "<image>\n{question}",
    ) -> None:
        self.data = data
        self.limit = limit
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt

    def questions(self) -> Iterator[dict[str, Any]]:
        if self.data is None:
            raise ValueError("task.data is not set: give shards or a .jsonl file of questions")
        source = (questions_from_jsonl(self.data) if isinstance(self.data, str) and self.data.endswith(".jsonl")
                  else questions_from_shards(self.data))
        for n, item in enumerate(source):
            if self.limit is not None and n >= self.limit:
                return
            yield item

    @torch.no_grad()
    def predict(self, model_dir: str | Path) -> list[dict[str, Any]]:
        from vlm.data.collate import Collator
        from vlm.data.formats import Record
        from vlm.evaluation.generation import generate
        from vlm.loading import build_processor
        from vlm.models.vlm import VisionLanguageModel

        model, tokenizer = VisionLanguageModel.from_pretrained(model_dir)
        model.eval()
        processor = build_processor(model, tokenizer)
        collate = Collator(tokenizer.pad_token_id, padding_side="left")
        eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None}
        predictions: list[dict[str, Any]] = []

        def flush(items: list[dict[str, Any]]) -> None:
            with_image = "<image>" in self.prompt
            records = [
                Record(messages=[{"role": "user", "content": self.prompt.format(question=it["question"])}],
                       images=[it["image"]] if with_image else [], meta={"key": it["id"]})
                for it in items
            ]
            batch = collate([processor.prompt(r) for r in records])
            out = generate(model, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                           max_new_tokens=self.max_new_tokens, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id)
            for it, tokens in zip(items, out):
                text = tokenizer.decode([t for t in tokens.tolist() if t not in eos], skip_special_tokens=True)
                predictions.append({"id": it["id"], "question": it["question"], "prediction": text.strip(),
                                    "answers": it["answers"], "question_type": it["question_type"],
                                    "image": it["image"]})

        pending: list[dict[str, Any]] = []
        for item in self.questions():
            pending.append(item)
            if len(pending) == self.batch_size:
                flush(pending)
                pending = []
        if pending:
            flush(pending)
        return predictions

    def run(self, model_dir: str | Path | None = None, predictions: str | Path | None = None,
            out_dir: str | Path = ".") -> dict[str, float]:
        if predictions:
            with open(predictions) as f:
                preds = [json.loads(line) for line in f if line.strip()]
            for p in preds:
                p["answers"] = _answers(p)
        elif model_dir:
            preds = self.predict(model_dir)
        else:
            raise ValueError("give model_dir=PATH (to answer the questions) or predictions=FILE.jsonl (to score them)")
        metrics = score(preds)
        out = Path(out_dir)
        with open(out / "predictions.jsonl", "w") as f:
            for p in preds:
                f.write(json.dumps({k: v for k, v in p.items() if k != "image"}) + "\n")
        return metrics
