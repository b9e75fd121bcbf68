"""A CLIP judge: an open_clip-style model that embeds images and class prompts; turning images into
what it expects; and the prompts of each class. Loading a judge by its ``clip.models`` entry is
:mod:`diffusion_core.judges`.

A judge is an open_clip model plus prompts for each class: the dataset's caption templates
(:func:`diffusion_core.data.dataset_prompts`) filled with its class names. Three kinds of
``clip.models`` entry:

* ``digit-clip`` (alias ``dataset-clip``): the dataset CLIP, a small CLIP trained by the pipeline
  itself on the training split's images and captions (:mod:`diffusion_core.digit_clip`, stage
  ``train_clip``), whatever the dataset; works offline, the default;
* ``ARCH:TAG``, e.g. ``ViT-B-32:laion2b_s34b_b79k``: a pretrained open_clip model, fetched through
  open_clip's own hub loading (needs internet once; then cached);
* ``ARCH:/path/to/weights``: the same architecture with weights from a local file.

Images in [-1, 1] with 1 or 3 channels are converted with the model's own preprocessing config
(size, interpolation, mean, std): to [0, 1], grey repeated to 3 channels, resized, normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffusion_core.checkpoint import CheckpointError
from diffusion_core.data import DIGIT_TEMPLATES, article  # templates live with their datasets; re-exported

# The judge the pipeline trains itself (stage train_clip) on the current dataset's captions:
# "digit-clip" (its historical name, the default) and "dataset-clip" are the same entry.
TRAINED_ENTRIES = ("digit-clip", "dataset-clip")


def class_prompts(class_names: list[str], templates: tuple[str, ...] = DIGIT_TEMPLATES) -> list[list[str]]:
    """Prompts per class; ``{digit}`` is the class index, ``{name}`` its name, ``{a}`` its article."""
    return [[t.format(digit=i, name=name, a=article(name)) for t in templates] for i, name in enumerate(class_names)]


class ClipModelError(CheckpointError):
    """A CLIP model entry that cannot be loaded; the message names the entry and what to do."""


@dataclass
class ClipJudge:
    name: str
    model: torch.nn.Module
    tokenizer: object
    preprocess: dict
    device: torch.device

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """images [N, C, H, W] in [-1, 1] (or uint8) -> L2-normalised embeddings [N, D]."""
        out = []
        for chunk in torch.split(images, batch_size):
            x = to_clip_input(chunk, self.preprocess).to(self.device)
            out.append(F.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[list[str]]) -> torch.Tensor:
        """Prompts [K][T] -> L2-normalised text embeddings [K, T, D]."""
        k, t = len(prompts), len(prompts[0])
        tokens = self.tokenizer([p for row in prompts for p in row]).to(self.device)
        emb = F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()
        return emb.reshape(k, t, -1)


def to_clip_input(images: torch.Tensor, preprocess: dict) -> torch.Tensor:
    """Digits -> the tensor a CLIP image tower expects, following its preprocess config."""
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float().add(1).div(2)
    if x.dim() == 3:
        x = x[:, None]
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    size = preprocess.get("size", x.shape[-1])
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if tuple(x.shape[-2:]) != size:
        mode = preprocess.get("interpolation", "bicubic")
        mode = mode if mode in ("bilinear", "bicubic", "nearest") else "bicubic"
        x = F.interpolate(x, size=size, mode=mode, antialias=mode != "nearest", align_corners=False if mode != "nearest" else None)
        x = x.clamp(0, 1)
    mean = torch.tensor(preprocess.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)
    return (x - mean) / std


def slug(entry: str) -> str:
    """A folder name for a clip.models entry."""
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in entry.replace(":", "__"))
    return keep.strip("_")[-80:]
