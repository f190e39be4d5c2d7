"""Preference pairs -> one batch: the chosen sequences, then the rejected ones, and each pair's images once.

The processor turns a `preference` record into the chosen features (`input_ids`, `labels`, `pixel_values`) plus
`rejected_input_ids` / `rejected_labels`: the same prompt and image placeholders with the rejected reply. This
collator stacks B pairs into rows `0..B-1` (chosen) and `B..2B-1` (rejected), padded together, and keeps
`pixel_values` for the B pairs only, so the dpo stage encodes each pair's images once and splices the features
into both of its rows (`vlm.stages.preference`). `keys` are the B pairs' keys.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlm.data.collate import Collator

REJECTED_KEYS = ("rejected_input_ids", "rejected_labels")


class PreferenceCollator(Collator):
    """A `Collator` for preference pairs (right padding; see the module docstring for the layout)."""

    def __call__(self, samples: Sequence[dict[str, Any]], lazy: bool = False) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        for s in samples:
            if any(k not in s for k in REJECTED_KEYS):
                raise ValueError(f"sample {s.get('key')!r} is not a preference pair (no rejected reply): the dpo "
                                 "stage reads data.format=preference")
        chosen = [{k: s[k] for k in ("input_ids", "labels", "pixel_values", "key") if k in s} for s in samples]
        rejected = [{"input_ids": s["rejected_input_ids"], "labels": s["rejected_labels"], "key": s.get("key", "")}
                    for s in samples]
        batch = super().__call__(chosen + rejected, lazy=lazy)
        batch["keys"] = batch["keys"][: len(samples)]
        return batch
