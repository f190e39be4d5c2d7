"""Projectors: vision tokens (N, T, in_dim) -> language-model embeddings (N, T', out_dim).

The model fills `in_dim` (encoder width) and `out_dim` (decoder width); Hydra configs give the rest with
`_partial_: true`, saved model directories with a registered `type` (vlm.models.registry). `num_tokens` tells the
processor how many `<image>` placeholders one tile needs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
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
    """

    part_type = "pixel_shuffle"

    def __init__(self, in_dim: int, out_dim: int, factor: int = 2, depth: int = 1) -> None:
        super().__init__(in_dim, out_dim, factor=factor, depth=depth)
        self.factor = factor
        self.proj = mlp(in_dim * factor * factor, out_dim, depth)

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
        if grid is None:
            side = math.isqrt(t)
            grid = (side, side)
        self._check(t, grid)
        s, (rows, cols) = self.factor, grid
        x = x.reshape(n, rows // s, s, cols // s, s, d).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n, (rows // s) * (cols // s), s * s * d)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self.proj(self.shuffle(x, grid))
