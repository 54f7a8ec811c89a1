"""Images as a person sees them: a batch of images tiled into one PNG grid."""

from __future__ import annotations

import io
import math
from typing import Any


def png_grid(images: Any) -> bytes:
    """uint8 (N, C, H, W) images tiled in a near-square grid with 2-pixel gaps, as PNG bytes."""
    from PIL import Image
    from torchvision.utils import make_grid

    columns = max(1, math.ceil(math.sqrt(len(images))))
    grid = make_grid(images.cpu(), nrow=columns, padding=2)  # (3, H, W): gray becomes RGB
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
