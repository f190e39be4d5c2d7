"""Who may attend to whom in the decoder: causal or prefix (GIT) attention, inside each sample of a packed row.

A packed row is marked by its position ids, which restart at 0 at every sample (`vlm.data.packing`). Two ways keep
each sample to itself, chosen from the decoder's attention implementation (`isolation`):
- `mask` (SDPA, eager, anything but flash attention): an additive float (B, 1, L, L) mask in the model dtype, 0 where
  a token may attend and `finfo.min` elsewhere: block-diagonal over the samples, causal (or the prefix mask) inside.
  A boolean 4D mask would be read as +1/0 by eager attention, which masks nothing, hence floats.
- `varlen` (flash_attention_2/3): no mask at all. The real tokens of all rows become one sequence (padding-free) and
  the decoder gets the sample boundaries as `cu_seq_lens` computed once from the position ids, which is how
  transformers runs flash attention's variable-length kernel. Flash attention is causal only: prefix attention
  needs the mask path.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

MASK, VARLEN = "mask", "varlen"


def attn_implementation(decoder: Any) -> str:
    config = getattr(decoder, "config", None)
    return str(getattr(config, "_attn_implementation", None) or getattr(config, "attn_implementation", None) or "")


def isolation(decoder: Any) -> str:
    """`varlen` under a flash-attention implementation, else `mask`."""
    return VARLEN if "flash" in attn_implementation(decoder).lower() else MASK


def segment_ids(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) sample number of each token in its row, 1, 2, ... (a new sample wherever the position is 0); 0 on
    padding (where `attention_mask` is 0)."""
    segments = (position_ids == 0).long().cumsum(-1)
    return segments if attention_mask is None else segments * (attention_mask != 0)


def allowed_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, prefix: bool,
                  segments: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, L) bool: query i may attend to key j. Causal (j <= i), or with `prefix` also both ways inside a
    contiguous run of image tokens; never to a padded key; with `segments`, only inside the query's own sample."""
    batch, length = input_ids.shape
    pos = torch.arange(length, device=input_ids.device)
    allowed = (pos[None, :, None] >= pos[None, None, :]).expand(batch, length, length)
    if prefix:
        image = input_ids == image_token_id
        starts = image & ~F.pad(image, (1, 0))[:, :-1]
        if segments is not None:  # an image that ends one sample and one that starts the next are two runs
            starts = starts | (image & (segments != F.pad(segments, (1, 0))[:, :-1]))
        run = starts.cumsum(-1)
        same_run = image[:, :, None] & image[:, None, :] & (run[:, :, None] == run[:, None, :])
        allowed = allowed | same_run
    allowed = allowed & attention_mask.bool()[:, None, :]
    if segments is not None:
        allowed = allowed & (segments[:, :, None] == segments[:, None, :])
    return allowed


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, L) bool -> (B, 1, L, L) additive float mask in `dtype`: 0 to attend, `finfo(dtype).min` to block."""
    bias = torch.zeros(allowed.shape[0], 1, *allowed.shape[1:], dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def flatten_packed(attention_mask: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The real tokens (attention_mask != 0) of every row, row after row, as one (1, N, ...) row per tensor: the
    padding-free layout of the `varlen` path. Image placeholders stay in order, so the splice is unchanged."""
    real = attention_mask.bool()
    return [t[real].unsqueeze(0) for t in tensors]


def varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """The flash-attention variable-length arguments of a (1, N) packed row, computed once per forward (not in
    every layer, where transformers would otherwise read them from the position ids with a host sync each)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
    return {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": int(max_q), "max_length_k": int(max_k)}
