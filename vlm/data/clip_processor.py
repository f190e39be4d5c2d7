"""The dual encoder's processor: a caption record with one image -> token ids and pixels for `vlm.models.clip`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class ClipProcessor:
    """Records, images and texts -> tensors of a `ClipModel`.

    `__call__(record)` is the data pipeline's processor (`vlm.data.datamodule.DataModule(processor=...)`): a caption
    record (the last assistant message is the caption, or `record.text`) with one image becomes
    `{"input_ids", "pixel_values" (1,3,H,W), "key"}`, which the standard collator pads and batches.
    """

    def __init__(self, tokenizer: Any, image_transform: Any, max_length: int = 77) -> None:
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.max_length = int(max_length)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token (set tokenizer.pad_token)")

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def token_ids(self, text: str) -> list[int]:
        """Tokens of one text, ending with the end-of-text token (the `eos` pooling position), cut at max_length."""
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        if len(ids) > self.max_length:
            ids = ids[: self.max_length - 1] + ids[-1:]
        return ids

    def texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (input_ids, attention_mask), right-padded."""
        rows = [self.token_ids(t) for t in texts]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    def image(self, image: Any) -> torch.Tensor:
        """PIL image -> (1, 3, S, S)."""
        pixels, _ = self.image_transform(image)
        return pixels[:1]

    def images(self, images: Sequence[Any]) -> torch.Tensor:
        return torch.cat([self.image(im) for im in images])

    def __call__(self, record: Any) -> dict[str, Any]:
        caption = next((m["content"] for m in reversed(record.messages) if m["role"] == "assistant"), record.text)
        if not caption:
            raise ValueError(f"sample {record.key!r} has no caption")
        if len(record.images) != 1:
            raise ValueError(f"sample {record.key!r} has {len(record.images)} images; contrastive pairs need one")
        return {"input_ids": torch.tensor(self.token_ids(caption), dtype=torch.long),
                "pixel_values": self.image(record.images[0]), "key": record.key}
