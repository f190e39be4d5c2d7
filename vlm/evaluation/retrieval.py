"""The `retrieval` task: image-text retrieval with a dual encoder, recall@K in both directions.

Pairs come from webdataset shards (an image and its caption: `txt`, or the json's `caption`). Every image queries all
captions (image->text) and every caption all images (text->image). A query's positives are the items paired with it;
captions that are identical strings count as the same caption, so an image's positives are all captions equal to its
own and a caption's positives all images that carry it (identical texts cannot be told apart by any model).

recall@K is the CLIP/COCO definition: the share of queries with a positive among the K most similar items. With one
positive per query it is torchmetrics' `RetrievalRecall`; with several it is `RetrievalHitRate` (RetrievalRecall
would count the share of all positives found), which is what is used here. Outputs:
`retrieval/{i2t,t2i}_recall@{1,5,10}`, their mean `retrieval/mean_recall`, and `retrieval/count`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from vlm.evaluation.zeroshot import embed_images, embed_texts, image_of, load_dual_encoder


def caption_of(sample: dict[str, Any]) -> str | None:
    text = sample.get("txt")
    if not (isinstance(text, str) and text.strip()):
        meta = sample.get("json")
        text = meta.get("caption") if isinstance(meta, dict) else None
    return text.strip() if isinstance(text, str) and text.strip() else None


def recall_at_k(similarity: torch.Tensor, positives: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Queries are rows of `similarity` (Q, N); `positives` (Q, N) bool.
    -> {k: share of queries with a hit in top k}."""
    from torchmetrics.retrieval import RetrievalHitRate

    queries, items = similarity.shape
    indexes = torch.arange(queries).unsqueeze(1).expand(queries, items).reshape(-1)
    out = {}
    for k in ks:
        metric = RetrievalHitRate(top_k=k)
        out[k] = float(metric(similarity.reshape(-1).float(), positives.reshape(-1), indexes=indexes))
    return out


class RetrievalTask:
    """Image<->text retrieval over the image-caption pairs of `data` (the first `limit` of them)."""

    name = "retrieval"

    def __init__(self, data: str | Sequence[str] | None = None, limit: int | None = None,
                 ks: Sequence[int] = (1, 5, 10), batch_size: int = 256) -> None:
        self.data = data
        self.limit = limit
        self.ks = [int(k) for k in ks]
        self.batch_size = int(batch_size)

    def pairs(self) -> Iterator[dict[str, Any]]:
        from vlm.data.tar import iterate_samples

        if self.data is None:
            raise ValueError("task.data is not set: give webdataset shards of images with captions")
        n = 0
        for sample in iterate_samples(self.data):
            image, text = image_of(sample), caption_of(sample)
            if image is None or text is None:
                continue
            if self.limit is not None and n >= self.limit:
                return
            n += 1
            yield {"id": sample["__key__"], "image": image, "caption": text}

    @torch.no_grad()
    def similarity(self, model: Any) -> tuple[list[dict[str, Any]], torch.Tensor]:
        """-> (pairs, image-by-text cosine similarity (N, N))."""
        was_training = model.training
        model.eval()
        try:
            processor = model.processor()
            pairs = list(self.pairs())
            if not pairs:
                raise ValueError(f"retrieval: no image-caption pairs in {self.data!r}")
            images = embed_images(model, processor, [p["image"] for p in pairs], self.batch_size)
            texts = embed_texts(model, processor, [p["caption"] for p in pairs], self.batch_size)
        finally:
            model.train(was_training)
        return pairs, images @ texts.t()

    def score(self, pairs: Sequence[dict[str, Any]], similarity: torch.Tensor) -> dict[str, float]:
        captions = [p["caption"] for p in pairs]
        ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        caption_id = torch.tensor([ids[c] for c in captions])
        positives = caption_id.unsqueeze(1) == caption_id.unsqueeze(0)  # (image i, text j): same caption string
        metrics: dict[str, float] = {}
        for direction, sim, pos in (("i2t", similarity, positives), ("t2i", similarity.t(), positives.t())):
            for k, value in recall_at_k(sim, pos, self.ks).items():
                metrics[f"retrieval/{direction}_recall@{k}"] = value
        metrics["retrieval/mean_recall"] = sum(metrics.values()) / len(metrics)
        metrics["retrieval/count"] = float(len(pairs))
        return metrics

    def evaluate(self, model: Any) -> dict[str, float]:
        """Metrics of a `ClipModel` in memory (used by the clip stage's validation and by `run`)."""
        return self.score(*self.similarity(model))

    def run(self, model_dir: str | Path | None = None, predictions: str | Path | None = None,
            out_dir: str | Path = ".", device: str = "auto", dtype: str = "auto",
            trust_remote_code: bool = False) -> dict[str, float]:
        if predictions:
            raise ValueError("retrieval scores a model's embeddings: give model_dir=PATH, not predictions")
        if not model_dir:
            raise ValueError("give model_dir=PATH (a clip run's model directory)")
        pairs, similarity = self.similarity(load_dual_encoder(model_dir, device, dtype, trust_remote_code))
        metrics = self.score(pairs, similarity)
        top = similarity.topk(min(5, similarity.shape[1]), dim=1).indices
        with open(Path(out_dir) / "predictions.jsonl", "w") as f:
            for p, row in zip(pairs, top):
                f.write(json.dumps({"id": p["id"], "caption": p["caption"],
                                    "top5_captions": [pairs[int(j)]["caption"] for j in row]}) + "\n")
        return metrics
