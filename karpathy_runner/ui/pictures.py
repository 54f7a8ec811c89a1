"""Images as a person sees them: a batch of images tiled into one PNG grid."""

from __future__ import annotations

import io
import math
from typing import Any

# the most pixels a grid may have: PIL's decompression-bomb warning threshold
# (Image.MAX_IMAGE_PIXELS), so that a viewer or a reader built on PIL opens it without a warning
GRID_PIXELS = 89_478_485
GAP = 2  # pixels between and around the images of a grid


def grid_shape(n: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) in pixels of png_grid's grid of n images of height x width."""
    columns = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    return rows * (height + GAP) + GAP, columns * (width + GAP) + GAP


def grid_capacity(height: int, width: int) -> int:
    """The most images of height x width that one grid of at most GRID_PIXELS holds."""
    low, high = 1, GRID_PIXELS
    while low < high:  # the grid's area grows with n
        middle = (low + high + 1) // 2
        rows, columns = grid_shape(middle, height, width)
        low, high = (middle, high) if rows * columns <= GRID_PIXELS else (low, middle - 1)
    return low


def png_grid(images: Any) -> bytes:
    """uint8 (N, C, H, W) images tiled in a near-square grid with 2-pixel gaps, as PNG bytes."""
    from PIL import Image
    from torchvision.utils import make_grid

    columns = max(1, math.ceil(math.sqrt(len(images))))
    grid = make_grid(images.cpu(), nrow=columns, padding=GAP)  # (3, H, W): gray becomes RGB
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
