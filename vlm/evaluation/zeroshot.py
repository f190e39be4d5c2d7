"""The `zeroshot` task: classify images with a dual encoder (`vlm.models.clip`) and no training on the classes.

Each class name is written into every prompt template; the normalised text embeddings of a class are averaged and
normalised again (CLIP's prompt ensembling), and an image takes the class whose embedding is most similar.

Images come from webdataset shards; a sample's class is read from its json: `label_field` (default `label`) holding
a string, an integer index into `classes`, or a dict formatted with `label_format` (the shapes world's
`{"shape": "circle", "color": "red"}` with "{color} {shape}" -> "red circle"). Samples without a label are skipped.
`classes` is a list of names, or a mapping label -> name used in the prompts (e.g. "orange circle": "an orange
circle"). Outputs: `zeroshot/top1`, `zeroshot/top5` (with at least 5 classes), `zeroshot/count`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def image_of(sample: Mapping[str, Any]) -> Any:
    return next((sample[k] for k in IMAGE_KEYS if k in sample), None)


@torch.no_grad()
def embed_images(model: Any, processor: Any, images: Sequence[Any], batch_size: int) -> torch.Tensor:
    """(N, E) normalised image embeddings, unmasked (the model is put in eval mode by the caller), computed on the
    model's device and returned in fp32 on the host, where the metrics are computed."""
    device = next(model.parameters()).device
    out = [model.encode_image(processor.images(images[i : i + batch_size]).to(device))
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).float().cpu() if out else torch.empty(0, model.embed_dim)


@torch.no_grad()
def embed_texts(model: Any, processor: Any, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = processor.texts(texts[i : i + batch_size])
        out.append(model.encode_text(ids.to(device), mask.to(device)))
    return torch.cat(out).float().cpu()


def load_dual_encoder(model_dir: str | Path, device: str = "auto", dtype: str = "auto",
                      trust_remote_code: bool = False) -> Any:
    """A CLIP model directory (read as data, vlm.models.registry) on `device` in `dtype` (vlm.device)."""
    from vlm.device import place
    from vlm.models.clip import ClipModel

    model, tokenizer = ClipModel.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise ValueError(f"{model_dir} holds no tokenizer")
    return place(model, device, dtype)


class ZeroShotTask:
    """Zero-shot classification of the labelled images in `data` (at most `limit` of them)."""

    name = "zeroshot"

    def __init__(
        self,
        data: str | Sequence[str] | None = None,
        classes: Sequence[str] | Mapping[str, str] | None = None,
        templates: Sequence[str] = ("{}.",),
        label_field: str = "label",
        label_format: str = "{color} {shape}",
        limit: int | None = None,
        batch_size: int = 256,
    ) -> None:
        if not classes:
            raise ValueError("zeroshot: give `classes` (a list of names or a mapping label -> name)")
        if isinstance(classes, Mapping):
            self.labels, self.names = [str(k) for k in classes], [str(v) for v in classes.values()]
        else:
            self.labels = self.names = [str(c) for c in classes]
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("zeroshot: every template needs a '{}' for the class name")
        self.data = data
        self.templates = list(templates)
        self.label_field = label_field
        self.label_format = label_format
        self.limit = limit
        self.batch_size = int(batch_size)

    # ---- data -----------------------------------------------------------------------------------------------
    def label_index(self, value: Any) -> int | None:
        """A sample's label (json value) -> class index; None when the sample has no label."""
        if value is None:
            return None
        if isinstance(value, bool):
            raise ValueError(f"zeroshot: a boolean is not a label: {value!r}")
        if isinstance(value, int):
            return value
        label = self.label_format.format(**value) if isinstance(value, Mapping) else str(value)
        try:
            return self.labels.index(label)
        except ValueError:
            raise ValueError(f"zeroshot: label {label!r} is not one of the {len(self.labels)} classes") from None

    def examples(self) -> Iterator[dict[str, Any]]:
        """id, image (PIL) and class index of each labelled sample, up to `limit`."""
        from vlm.data.tar import iterate_samples

        if self.data is None:
            raise ValueError("task.data is not set: give webdataset shards with labelled images")
        n = 0
        for sample in iterate_samples(self.data):
            meta = sample.get("json") or {}
            index = self.label_index(meta.get(self.label_field) if isinstance(meta, Mapping) else None)
            image = image_of(sample)
            if index is None or image is None:
                continue
            if self.limit is not None and n >= self.limit:
                return
            n += 1
            yield {"id": sample["__key__"], "image": image, "target": index}

    # ---- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def classifier(self, model: Any, processor: Any) -> torch.Tensor:
        """(C, E): per class, the normalised mean of its templates' normalised text embeddings."""
        prompts = [t.format(name) for name in self.names for t in self.templates]
        emb = embed_texts(model, processor, prompts, self.batch_size)
        emb = emb.view(len(self.names), len(self.templates), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def predict(self, model: Any) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor]:
        """-> (predictions, logits (N, C), targets (N,)) for the labelled images."""
        was_training = model.training
        model.eval()
        try:
            processor = model.processor()
            weights = self.classifier(model, processor)
            examples = list(self.examples())
            if not examples:
                raise ValueError(f"zeroshot: no labelled images in {self.data!r}")
            images = embed_images(model, processor, [e["image"] for e in examples], self.batch_size)
        finally:
            model.train(was_training)
        logits = 100.0 * images @ weights.t()
        targets = torch.tensor([e["target"] for e in examples])
        top = logits.topk(min(5, len(self.names)), dim=1).indices
        predictions = [
            {"id": e["id"], "label": self.names[e["target"]], "prediction": self.names[int(t[0])],
             "top5": [self.names[int(i)] for i in t]}
            for e, t in zip(examples, top)
        ]
        return predictions, logits, targets

    def evaluate(self, model: Any) -> dict[str, float]:
        """Metrics of a `ClipModel` in memory (used by the clip stage's validation and by `run`)."""
        return self.score(*self.predict(model)[1:])

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        from torchmetrics.functional.classification import multiclass_accuracy

        num_classes = len(self.names)
        metrics = {"zeroshot/top1": float(multiclass_accuracy(logits, targets, num_classes, average="micro", top_k=1))}
        if num_classes >= 5:
            metrics["zeroshot/top5"] = float(
                multiclass_accuracy(logits, targets, num_classes, average="micro", top_k=5))
        metrics["zeroshot/count"] = float(len(targets))
        return metrics

    def run(self, model_dir: str | Path | None = None, predictions: str | Path | None = None,
            out_dir: str | Path = ".", device: str = "auto", dtype: str = "auto",
            trust_remote_code: bool = False) -> dict[str, float]:
        if predictions:  # score a file of {"label", "prediction"} rows from any model
            with open(predictions) as f:
                preds = [json.loads(line) for line in f if line.strip()]
            if not preds:
                raise ValueError(f"{predictions} holds no predictions")
            correct = [float(p["prediction"] == p["label"]) for p in preds]
            metrics = {"zeroshot/top1": sum(correct) / len(correct), "zeroshot/count": float(len(correct))}
        elif model_dir:
            preds, logits, targets = self.predict(load_dual_encoder(model_dir, device, dtype, trust_remote_code))
            metrics = self.score(logits, targets)
        else:
            raise ValueError("give model_dir=PATH (a clip run's model directory) or predictions=FILE.jsonl")
        with open(Path(out_dir) / "predictions.jsonl", "w") as f:
            for p in preds:
                f.write(json.dumps(p) + "\n")
        return metrics
