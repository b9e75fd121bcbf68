"""Image grids and strips saved as PNG (torchvision's make_grid, PIL to write)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from diffusion_core.data import to_uint8


def grid_image(images: torch.Tensor, nrow: int, padding: int = 2, scale: int = 1) -> Image.Image:
    """images [N, C, H, W] in [-1, 1] (or uint8) -> a PIL grid with ``nrow`` images per row."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=255)  # [C', H', W'] uint8
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
