"""Which judge a ``clip.models`` entry names, and loading it: the dataset CLIP that the train_clip
stage trains (``digit-clip``, :mod:`diffusion_core.digit_clip`), or an open_clip model, pretrained
(``ARCH:TAG``) or from a local file (``ARCH:/path/to/weights``). See :mod:`diffusion_core.clip_judge`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusion_core.clip_judge import TRAINED_ENTRIES, ClipJudge, ClipModelError
from diffusion_core.digit_clip import load_digit_clip


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
