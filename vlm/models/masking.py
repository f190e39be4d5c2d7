"""FLIP patch masking: each image keeps a random subset of its patch tokens, so the encoder runs on fewer tokens.

Applied after the position embeddings are added (a kept token keeps its position), before the transformer blocks.
Prefix tokens (CLS, registers) are always kept; of the N patch tokens each sample keeps exactly
`num_kept(N, ratio) = round((1 - ratio) * N)` (at least 1), a fresh subset per sample and call drawn on the tokens'
device, so the batch stays rectangular. Encoders apply it only in training; evaluation always sees every token.
"""

from __future__ import annotations

import torch

MAX_MASK_RATIO = 0.9


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patch tokens each image keeps at `mask_ratio`: round((1 - ratio) * N), never fewer than 1."""
    check_mask_ratio(mask_ratio)
    return max(1, int(round((1.0 - mask_ratio) * num_patches)))


def check_mask_ratio(mask_ratio: float) -> None:
    if not 0.0 <= mask_ratio <= MAX_MASK_RATIO:
        raise ValueError(f"mask_ratio must lie in [0, {MAX_MASK_RATIO}], got {mask_ratio}")


def random_keep(
    batch: int, num_patches: int, mask_ratio: float, device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(batch, num_kept) indices of the patch tokens each sample keeps: argsort of uniform noise per sample
    (a uniformly random subset), then sorted so the kept tokens stay in raster order."""
    keep = num_kept(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def keep_tokens(tokens: torch.Tensor, keep: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(B, P + N, D) tokens -> (B, P + K, D): the P prefix tokens, then the patch tokens at `keep` (B, K)."""
    if keep.dim() != 2 or keep.shape[0] != tokens.shape[0]:
        raise ValueError(f"keep must be (batch, kept) = ({tokens.shape[0]}, K); got {tuple(keep.shape)}")
    prefix, patches = tokens[:, :num_prefix], tokens[:, num_prefix:]
    index = keep.to(tokens.device).unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return torch.cat([prefix, patches.gather(1, index)], dim=1)


def mask_tokens(
    tokens: torch.Tensor, num_prefix: int, mask_ratio: float = 0.0, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply FLIP masking to embedded tokens: explicit `keep` indices win; else a random subset at `mask_ratio`;
    ratio 0 and no `keep` returns the tokens unchanged."""
    if keep is None:
        if mask_ratio <= 0.0:
            check_mask_ratio(mask_ratio)
            return tokens
        keep = random_keep(tokens.shape[0], tokens.shape[1] - num_prefix, mask_ratio, tokens.device)
    return keep_tokens(tokens, keep, num_prefix)
