"""CLIP judges: load them, turn images into what they expect, and score images against prompts.

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
from pathlib import Path

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


def parse_entry(entry: str) -> tuple[str, str | None]:
    """'digit-clip' -> ('digit-clip', None); 'ViT-B-32:laion2b_s34b_b79k' -> (arch, tag or path)."""
    if entry in TRAINED_ENTRIES:
        return entry, None
    if ":" not in entry:
        raise ClipModelError(
            f"clip.models entry {entry!r}: use 'digit-clip' (alias 'dataset-clip'), 'ARCH:PRETRAINED_TAG' (e.g. ViT-B-32:laion2b_s34b_b79k) or 'ARCH:/path/to/weights'"
        )
    arch, tag = entry.split(":", 1)
    return arch, tag


def check_entry(entry: str) -> None:
    """Cheap checks before any work: the syntax, the architecture, and the tag or local file."""
    import open_clip

    arch, tag = parse_entry(entry)
    if tag is None:
        return
    if arch not in open_clip.list_models():
        raise ClipModelError(f"clip.models entry {entry!r}: unknown open_clip architecture {arch!r}")
    looks_like_path = "/" in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path:
        if not Path(tag).is_file():
            raise ClipModelError(f"clip.models entry {entry!r}: weights file {tag} not found")
    elif tag not in open_clip.list_pretrained_tags_by_model(arch):
        raise ClipModelError(
            f"clip.models entry {entry!r}: {tag!r} is not a pretrained tag of {arch} "
            f"(known: {', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'})"
        )


def load_judge(
    entry: str,
    device: torch.device | str = "cpu",
    digit_clip_path: str | Path = "models/digit-clip.pt",
    expect_classes: list[str] | None = None,
) -> ClipJudge:
    """Load a judge; ``expect_classes`` (caption names) checks the dataset CLIP was trained on them."""
    device = torch.device(device)
    arch, tag = parse_entry(entry)
    if tag is None:
        from diffusion_core.digit_clip import load_digit_clip

        model, tokenizer, preprocess = load_digit_clip(digit_clip_path, expect_classes)
        return ClipJudge(entry, model.to(device).eval(), tokenizer, preprocess, device)
    import open_clip
    from open_clip.model import get_model_preprocess_cfg

    check_entry(entry)
    try:
        model = open_clip.create_model(arch, pretrained=tag, device=device)
    except Exception as exc:  # noqa: BLE001 - network, hub and file errors all end here
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ClipModelError(
            f"clip.models entry {entry!r}: could not load the pretrained weights ({reason}). Offline, "
            f"download them once on a machine with internet (open_clip caches them under "
            f"~/.cache/huggingface) and copy the cache here, or give a local file as '{arch}:/path/to/weights.bin'"
        ) from None
    tokenizer = open_clip.get_tokenizer(arch)
    return ClipJudge(entry, model.eval(), tokenizer, dict(get_model_preprocess_cfg(model)), device)


def slug(entry: str) -> str:
    """A folder name for a clip.models entry."""
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in entry.replace(":", "__"))
    return keep.strip("_")[-80:]
