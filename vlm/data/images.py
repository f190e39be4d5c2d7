"""Image -> normalised pixel tiles, and the token string that stands for them in the text.

The transform and the placeholder must agree on the grid: `ImageTransform` returns the grid it used and
`image_placeholder` turns that grid into exactly one `<image>` run per tile, in the same order as the tiles.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from vlm.data.tokens import GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, tile_token

Grid = tuple[int, int]


def candidate_grids(max_tiles: int) -> list[Grid]:
    """All (rows, cols) with rows*cols <= max_tiles, fewest tiles first (ties keep the smaller grid)."""
    grids = [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles]
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


def choose_grid(width: int, height: int, image_size: int, max_tiles: int) -> Grid:
    """The grid whose aspect ratio is closest to the image's (in log space, so wide and tall are symmetric).

    Among grids with the same ratio (1x1, 2x2, ...) a larger one wins only while the image has at least half
    the pixels that grid would hold, so small images are not blown up into many blurry tiles (InternVL's rule).
    """
    aspect = math.log(width / height)
    area = width * height
    best, best_diff = (1, 1), math.inf
    for rows, cols in candidate_grids(max_tiles):
        diff = abs(aspect - math.log(cols / rows))
        if diff < best_diff - 1e-9:
            best, best_diff = (rows, cols), diff
        elif abs(diff - best_diff) <= 1e-9 and area > 0.5 * image_size * image_size * rows * cols:
            best = (rows, cols)
    return best


class ImageTransform:
    """RGB -> bicubic resize -> normalise; with `max_tiles > 1`, tiles plus a global thumbnail.

    `__call__(image) -> (tiles (n,3,S,S) float32, grid)`. Grid (1, 1) always means one plain tile: when tiling
    picks a single tile, no thumbnail is added (it would repeat the tile), and the placeholder has no markers.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], max_tiles: int = 1):
        self.image_size = int(image_size)
        self.max_tiles = int(max_tiles)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
        # (x / 255 - mean) / std as one multiply-subtract, in numpy: single-threaded on purpose (torch's
        # intra-op threads on such small arrays cost 10-50x more than the work on a busy machine)
        self._scale = (1.0 / (255.0 * self.std)).numpy()  # (3, 1, 1)
        self._shift = (self.mean / self.std).numpy()

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        # channels first while still uint8 (a quarter of the bytes to move), made contiguous there, then one
        # conversion: `astype` keeps a transposed view's strides, and strided float arithmetic and the later copy
        # into the batch were 3-4x slower than all of this on contiguous arrays
        pixels = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)).astype(np.float32)
        pixels *= self._scale
        pixels -= self._shift
        return torch.from_numpy(pixels)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, Grid]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        size = self.image_size
        grid = (1, 1)
        if self.max_tiles > 1:
            grid = choose_grid(image.width, image.height, size, self.max_tiles)
        if grid == (1, 1):
            resized = image.resize((size, size), Image.Resampling.BICUBIC)
            return self._to_tensor(resized).unsqueeze(0), grid
        rows, cols = grid
        big = self._to_tensor(image.resize((cols * size, rows * size), Image.Resampling.BICUBIC))
        # (3, rows*S, cols*S) -> (rows*cols, 3, S, S), row-major
        tiles = big.view(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, size, size)
        thumbnail = self._to_tensor(image.resize((size, size), Image.Resampling.BICUBIC)).unsqueeze(0)
        return torch.cat([tiles, thumbnail]), grid


def image_placeholder(grid: Grid, tokens_per_image: int) -> str:
    """The token string one `<image>` becomes: T image tokens per tile, tiles led by their markers."""
    run = IMAGE_TOKEN * tokens_per_image
    if tuple(grid) == (1, 1):
        return run
    rows, cols = grid
    parts = [tile_token(r, c) + run for r in range(1, rows + 1) for c in range(1, cols + 1)]
    parts.append(GLOBAL_IMAGE_TOKEN + run)
    return "".join(parts)

