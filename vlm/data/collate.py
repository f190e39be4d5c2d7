"""Processor outputs -> one padded batch (right padding for training, left for generation)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vlm.data.processor import IGNORE_INDEX


def concat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`torch.cat` along dim 0, through numpy for CPU tensors: one thread, a plain copy. (torch's intra-op threads
    made a 20 MB concatenation take 0.5 s instead of 4 ms on a busy 2-core machine.)"""
    if all(t.device.type == "cpu" and not t.requires_grad for t in tensors):
        return torch.from_numpy(np.concatenate([t.numpy() for t in tensors]))
    return torch.cat(list(tensors))


class Parts:
    """Tensors to be concatenated along dim 0, left unconcatenated (`Collator(..., lazy=True)`): `pack_batch` writes
    them straight into the shared buffer, saving the copy a concatenation would make."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = list(tensors)  # as they are: pack_batch copies strided ones in one pass
        first = self.tensors[0]
        if any(t.dtype != first.dtype or t.shape[1:] != first.shape[1:] for t in self.tensors):
            raise ValueError("Parts: tensors differ in dtype or trailing shape")
        self.dtype = first.dtype
        self.shape = (sum(t.shape[0] for t in self.tensors), *first.shape[1:])

    def materialize(self) -> torch.Tensor:
        return concat(self.tensors)


class Collator:
    """Pads `input_ids` with `pad_token_id` and `labels` with -100; the attention mask is zero on padding only
    (it is built from lengths, so a pad id that also occurs in the text is still attended). `pixel_values` of all
    samples are concatenated in sample order, which is the order the model splices them in."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: the tokenizer needs a pad token (see add_vlm_tokens)")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side

    def pad(self, rows: Sequence[torch.Tensor], value: int, length: int) -> torch.Tensor:
        """(len(rows), length) long tensor: each row on this collator's padding side, the rest `value`."""
        if not all(row.device.type == "cpu" and not row.requires_grad for row in rows):
            out = torch.full((len(rows), length), value, dtype=torch.long)
            for i, row in enumerate(rows):
                if self.padding_side == "right":
                    out[i, : len(row)] = row
                else:
                    out[i, length - len(row) :] = row
            return out
        # numpy: a row copy is a fraction of a microsecond there, several in torch's indexing
        padded = np.full((len(rows), length), value, dtype=np.int64)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                padded[i, : len(row)] = row.numpy()
            else:
                padded[i, length - len(row) :] = row.numpy()
        return torch.from_numpy(padded)

    def _mask(self, lengths: Sequence[int], length: int) -> torch.Tensor:
        mask = np.zeros((len(lengths), length), dtype=np.int64)
        for i, n in enumerate(lengths):
            if self.padding_side == "right":
                mask[i, :n] = 1
            elif n:
                mask[i, length - n :] = 1
        return torch.from_numpy(mask)

    def __call__(self, samples: Sequence[dict[str, Any]], lazy: bool = False) -> dict[str, Any]:
        """lazy: `pixel_values` as `Parts` (for `vlm.data.handover.pack_batch`, which concatenates them into shared
        memory) instead of one tensor."""
        if not samples:
            raise ValueError("cannot collate an empty batch")
        ids = [s["input_ids"] for s in samples]
        length = max(len(x) for x in ids)
        batch: dict[str, Any] = {
            "input_ids": self.pad(ids, self.pad_token_id, length),
            "attention_mask": self._mask([len(x) for x in ids], length),
        }
        if all("labels" in s for s in samples):
            batch["labels"] = self.pad([s["labels"] for s in samples], IGNORE_INDEX, length)
        pixels = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = (
                Parts(pixels) if lazy and all(p.device.type == "cpu" for p in pixels) else concat(pixels))
        batch["keys"] = [str(s.get("key", "")) for s in samples]
        return batch
