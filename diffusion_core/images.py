"""Image grids and strips saved as PNG (PIL to write).

:func:`make_grid` lays images out as torchvision's ``make_grid`` does (same sizes and padding),
without importing torchvision, whose import (it loads its detection models and torch._dynamo) would
add seconds to the start-up of the train, sample and report stages, which need nothing else from it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from diffusion_core.data import to_uint8


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: int = 0) -> torch.Tensor:
    """[N, C, H, W] -> [C, H', W']: ``nrow`` images per row, ``padding`` pixels of ``pad_value``
    between and around them (torchvision's layout, a single image unpadded as there; torchvision would
    also turn one channel into three)."""
    n, c, h, w = images.shape
    if n == 1:  # torchvision returns a single image unpadded
        return images[0]
    cols = min(nrow, n)
    rows = -(-n // cols)
    ch, cw = h + padding, w + padding
    grid = images.new_full((c, rows * ch + padding, cols * cw + padding), pad_value)
    for k in range(n):
        y, x = divmod(k, cols)
        grid[:, y * ch + padding : y * ch + padding + h, x * cw + padding : x * cw + padding + w] = images[k]
    return grid


def grid_image(images: torch.Tensor, nrow: int, padding: int = 2, scale: int = 1) -> Image.Image:
    """images [N, C, H, W] in [-1, 1] (or uint8) -> a PIL grid with ``nrow`` images per row."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=255)  # [C, H', W'] uint8
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if images.shape[1] == 1 else arr, mode="L" if images.shape[1] == 1 else "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, nrow, scale=scale).save(path)
    return path
