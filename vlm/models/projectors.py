"""Projectors: vision tokens (N, T, in_dim) -> language-model embeddings (N, T', out_dim).

The model fills `in_dim` (encoder width) and `out_dim` (decoder width); Hydra configs give the rest with
`_partial_: true`, saved model directories with a registered `type` (vlm.models.registry). `num_tokens` tells the
processor how many `<image>` placeholders one tile needs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, out_dim: int, depth: int) -> nn.Module:
    """Linear, then (GELU, Linear) x (depth - 1): depth 2 is LLaVA-1.5's `mlp2x_gelu`."""
    if depth < 1:
        raise ValueError(f"projector depth must be >= 1, got {depth}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers) if depth > 1 else layers[0]


class Projector(nn.Module):
    """Base: keeps its constructor options so a saved model can rebuild it (`export_config`)."""

    part_type: str  # its name in vlm.models.registry

    def __init__(self, in_dim: int, out_dim: int, **options: Any) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.options = in_dim, out_dim, options

    def num_tokens(self, t_in: int, grid: tuple[int, int]) -> int:
        """Tokens per image after projection, given the encoder's tokens and patch grid."""
        return t_in

    def export_config(self) -> dict[str, Any]:
        return {"type": self.part_type, **self.options}


class LinearProjector(Projector):
    part_type = "linear"

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self.proj(x)


class MLPProjector(Projector):
    """LLaVA-1.5's projector: Linear-GELU-Linear at `depth=2`."""

    part_type = "mlp"

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2) -> None:
        super().__init__(in_dim, out_dim, depth=depth)
        self.proj = mlp(in_dim, out_dim, depth)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self.proj(x)


class GITProjector(Projector):
    """GIT's projector: Linear + LayerNorm, so image tokens arrive at the scale of the text embeddings."""

    part_type = "git"

    def __init__(self, in_dim: int, out_dim: int, eps: float = 1e-5) -> None:
        super().__init__(in_dim, out_dim, eps=eps)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self.norm(self.proj(x))


class PixelShuffleProjector(Projector):
    """Merge each `factor` x `factor` block of neighbouring patches into one token (T' = T / factor^2), then project.

    Fewer, wider tokens (Idefics3 / nanoVLM): the decoder sees factor^2 times shorter image runs.
    `positions` (> 0): a learned `positions` x `positions` table of 2D position embeddings added to the output
    tokens (resampled bilinearly for another grid), as in Honeybee's C-Abstractor. A decoder with rotary positions
    sees only where a token sits in the text; the table tells it where the token sits in the picture, so "where is
    the red circle?" is one look-up (the token that matches carries its place) instead of a hop through the ViT's
    faint position embeddings.
    """

    part_type = "pixel_shuffle"

    def __init__(self, in_dim: int, out_dim: int, factor: int = 2, depth: int = 1, positions: int = 0) -> None:
        super().__init__(in_dim, out_dim, factor=factor, depth=depth, positions=positions)
        self.factor = factor
        self.proj = mlp(in_dim * factor * factor, out_dim, depth)
        self.position = None
        if positions:
            self.position = nn.Parameter(torch.randn(positions, positions, out_dim) * POSITION_INIT_STD)

    def _check(self, t_in: int, grid: tuple[int, int]) -> None:
        rows, cols = grid
        if rows * cols != t_in:
            raise ValueError(f"pixel shuffle needs grid tokens only (drop_cls): {t_in} tokens, grid {rows}x{cols}")
        if rows % self.factor or cols % self.factor:
            raise ValueError(f"pixel shuffle factor {self.factor} does not divide the patch grid {rows}x{cols}")

    def num_tokens(self, t_in: int, grid: tuple[int, int]) -> int:
        self._check(t_in, grid)
        return t_in // (self.factor * self.factor)

    def shuffle(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        n, t, d = x.shape
        rows, cols = grid or _square(t)
        self._check(t, (rows, cols))
        s = self.factor
        x = x.reshape(n, rows // s, s, cols // s, s, d).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n, (rows // s) * (cols // s), s * s * d)

    def position_table(self, rows: int, cols: int) -> torch.Tensor:
        """(rows * cols, out_dim): the learned table, resampled when the output grid is another size."""
        table = self.position
        if tuple(table.shape[:2]) != (rows, cols):
            table = F.interpolate(table.permute(2, 0, 1)[None], size=(rows, cols), mode="bilinear",
                                  align_corners=False)[0].permute(1, 2, 0)
        return table.reshape(rows * cols, -1)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        rows, cols = grid or _square(x.shape[1])
        out = self.proj(self.shuffle(x, (rows, cols)))
        if self.position is not None:
            out = out + self.position_table(rows // self.factor, cols // self.factor).to(out.dtype)
        return out


POSITION_INIT_STD = 0.5  # about the projected image features' own scale, so the place is legible from step one


def _square(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    return side, side
