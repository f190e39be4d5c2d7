"""What every vision encoder promises the rest of the model: token features, their grid, and how to rebuild it.

The projector, the processor (resolution, normalisation, tokens per image) and the saved model directory all read
these members, so an encoder family is added by subclassing `VisionEncoder` and nothing else changes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_NAME = "model.safetensors"
ENCODER_PREFIX = "encoder."


class VisionEncoder(nn.Module, ABC):
    """Images (N, 3, H, W) -> token features (N, num_tokens, hidden_size) of hidden layer `feature_layer`.

    Subclasses set `hidden_size`, `patch_size`, `image_size`, `image_mean`, `image_std`, `num_prefix_tokens`
    (CLS and register tokens the backbone produces), `feature_layer` and `drop_cls`.
    """

    part_type: str  # its name in vlm.models.registry, written into saved model directories
    hidden_size: int
    patch_size: int
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    num_prefix_tokens: int
    feature_layer: int
    drop_cls: bool

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols) at the current resolution."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols + (0 if self.drop_cls else self.num_prefix_tokens)

    @abstractmethod
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    def forward_features(
        self, pixel_values: torch.Tensor, mask_ratio: float = 0.0, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Last-layer tokens with the prefix tokens first: (N, num_prefix_tokens + K, hidden_size), for pooling.

        FLIP masking (`vlm.models.masking`): in training mode each image keeps round((1 - mask_ratio) * rows*cols)
        random patch tokens (or the patch indices `keep` (N, K)) and the blocks run on those only. In eval mode
        `mask_ratio` is ignored (K = rows*cols); explicit `keep` indices apply in either mode.
        """
        raise NotImplementedError(f"{type(self).__name__} has no forward_features (needed for contrastive training)")

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """forward_features' tokens -> one (N, hidden_size) vector per image, as the backbone pools them."""
        raise NotImplementedError(f"{type(self).__name__} has no pool (needed for contrastive training)")

    def forward_pooled(self, pixel_values: torch.Tensor, mask_ratio: float = 0.0) -> torch.Tensor:
        """(N, 3, H, W) -> (N, hidden_size): pooled last-layer features, FLIP-masked in training."""
        return self.pool(self.forward_features(pixel_values, mask_ratio))

    def _mask(self, tokens: torch.Tensor, mask_ratio: float, keep: torch.Tensor | None) -> torch.Tensor:
        from vlm.models.masking import mask_tokens

        return mask_tokens(tokens, self.num_prefix_tokens, mask_ratio if self.training else 0.0, keep)

    @abstractmethod
    def set_image_size(self, size: int) -> None:
        """Change the input resolution; position embeddings are interpolated."""

    @abstractmethod
    def export_config(self) -> dict[str, Any]:
        """The saved spec (`type` + plain arguments) that rebuilds this encoder offline: random weights, same shapes."""

    def position_tables(self) -> dict[str, int]:
        """State-dict keys of learned position tables -> number of leading prefix rows (not on the grid)."""
        return {}

    def _check_image_size(self, size: int) -> None:
        # Not necessarily a multiple: SigLIP so400m/14 runs at 384 px, a 27x27 grid (the patch conv floors).
        if size < self.patch_size:
            raise ValueError(f"image size {size} is smaller than the patch size {self.patch_size}")

    def _check_feature_layer(self, num_layers: int) -> None:
        if not -num_layers <= self.feature_layer < num_layers:
            raise ValueError(f"feature_layer {self.feature_layer} is outside [-{num_layers}, {num_layers - 1}]")

    def load_encoder_weights(self, path: str | Path) -> None:
        """Load the `encoder.*` weights of a model directory (or a .safetensors file), e.g. a CLIP run's output.

        Shapes must match exactly, except position tables, which are resampled to this encoder's grid.
        """
        from safetensors.torch import load_file

        path = Path(path)
        file = path / WEIGHTS_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"init_from: no weights at {file}")
        state = {k[len(ENCODER_PREFIX):]: v for k, v in load_file(str(file)).items() if k.startswith(ENCODER_PREFIX)}
        if not state:
            raise ValueError(f"init_from: {file} holds no '{ENCODER_PREFIX}*' weights")
        own = self.state_dict()
        for key, prefix in self.position_tables().items():
            if key in state and key in own and state[key].shape != own[key].shape:
                state[key] = resample_positions(state[key], own[key].shape[-2], prefix)
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(
                f"init_from {file} does not fit this encoder: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                f"shape mismatch {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:5]]}"
            )
        self.load_state_dict(state, strict=True)


def resample_positions(table: torch.Tensor, rows: int, num_prefix: int) -> torch.Tensor:
    """Resample a learned position table ((P + g*g, D) or (1, P + g*g, D)) to `rows` rows, bicubically on the grid."""
    squeeze = table.dim() == 2
    t = table.unsqueeze(0) if squeeze else table
    prefix, grid = t[:, :num_prefix], t[:, num_prefix:]
    old, new = math.isqrt(grid.shape[1]), math.isqrt(rows - num_prefix)
    if old * old != grid.shape[1] or new * new != rows - num_prefix:
        raise ValueError(f"cannot resample a position table of {t.shape[1]} rows to {rows} (not square grids)")
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, dim).to(table.dtype)
    out = torch.cat([prefix, grid], dim=1)
    return out.squeeze(0) if squeeze else out
