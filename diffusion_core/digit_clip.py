"""The dataset CLIP ("digit-clip", alias "dataset-clip"): a small CLIP trained offline on the
training split of whatever dataset the pipeline runs on; the pipeline's default judge.

It is a real open_clip ``CLIP`` (a ViT image tower at the dataset's image size that cuts each image
into ``clip.digit_clip_patch_grid`` x ``clip.digit_clip_patch_grid`` patches, 14x14-pixel patches on
28x28 digits at the default grid of 2; grey images enter as three equal channels; a text transformer with open_clip's BPE tokenizer) trained with open_clip's
``ClipLoss`` on pairs of an image and a caption drawn from the dataset's templates for its class
(:data:`~diffusion_core.data.DIGIT_TEMPLATES` for digits). Images get small random shifts so the
judge does not depend on exact centring, and random horizontal flips where the dataset has them.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusion_core.progress import progress_bar

from diffusion_core.checkpoint import FORMAT_VERSION, load_file, save_atomic
from diffusion_core.checkpoint import CheckpointError
from diffusion_core.clip_judge import DIGIT_TEMPLATES, ClipJudge, class_prompts, to_clip_input
from diffusion_core.data import random_hflip, to_model_range
from diffusion_core.optim import build_optimizer

MAX_CONTEXT_LENGTH = 77  # CLIP's
# The layers of open_clip's CLIP that read the input or write the embedding (Muon leaves them to
# AdamW): the patch embedding, both position tables and both output projections. Muon takes the
# transformer blocks' matrices.
IO_LAYERS = ("visual.conv1", "visual.positional_embedding", "visual.proj", "positional_embedding", "text_projection")
WEIGHT_DECAY = 0.05


def make_optimizer(model, optimizer: str, lr: float, muon_lr: float):
    """digit-clip's optimizer (``clip.digit_clip_optimizer``): ``muon`` (Muon at ``muon_lr`` for the
    transformer blocks' matrices, AdamW at ``lr`` for the rest) or ``adamw`` (at ``lr``)."""
    return build_optimizer(optimizer, model, lr, muon_lr, WEIGHT_DECAY, io_layers=IO_LAYERS)


def caption_tokens(captions: list[str]) -> int:
    """Tokens in the longest caption, the start and end-of-text tokens included: the text tower's
    context length. Its attention is causal and the caption's embedding is read at the end-of-text
    token, so positions after it never reach the embedding, and a longer context would only cost
    time (digit-clip used 24 before; the digits' longest caption has 12 tokens)."""
    from open_clip.tokenizer import SimpleTokenizer

    tokens = SimpleTokenizer(context_length=MAX_CONTEXT_LENGTH)(captions)
    return int((tokens != 0).sum(1).max())


def arch_config(image_size: int, width: int, layers: int, embed_dim: int, context_length: int, patch_grid: int = 2) -> dict[str, Any]:
    """open_clip's CLIP config for digit-clip: a ViT on ``patch_grid`` x ``patch_grid`` patches
    (2: four 14x14-pixel patches at 28x28; why: docs/results/digit-clip.md)."""
    if image_size % patch_grid:
        raise ValueError(f"digit-clip patch grid {patch_grid} does not divide the image size {image_size}")
    heads_width = max(16, width // 2)
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"layers": layers, "width": width, "head_width": heads_width, "patch_size": image_size // patch_grid, "image_size": image_size},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width, "heads": max(1, width // heads_width), "layers": layers},
    }


def build(arch: dict[str, Any]):
    import open_clip
    from open_clip.model import set_model_preprocess_cfg

    model = open_clip.CLIP(arch["embed_dim"], arch["vision_cfg"], arch["text_cfg"])
    size = arch["vision_cfg"]["image_size"]
    preprocess = {"size": size, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "resize_mode": "shortest"}
    set_model_preprocess_cfg(model, preprocess)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=arch["text_cfg"]["context_length"])
    return model, tokenizer, preprocess


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator, pad: str = "constant") -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels each way.

    ``pad="constant"`` fills the uncovered border with -1 (the black background of digits and
    Fashion-MNIST); ``"replicate"`` repeats the edge pixels (photos, which have no background).
    """
    if max_shift == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0) if pad == "constant" else F.pad(x, (max_shift,) * 4, mode=pad)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


class CompactVocabulary:
    """Train the text tower on the rows of its token embedding that the captions use.

    The captions use a few dozen of the tokenizer's 49,408 tokens, but an ``nn.Embedding``'s
    backward fills a dense gradient of the whole table and AdamW then steps every row (its share of
    a step: bench/step_parts.py). Rows that no caption uses get a zero gradient, so
    AdamW (an elementwise update) only weight-decays them, which no caption can see. Training a small table
    of the used rows instead gives the used rows exactly the same updates.

    ``with CompactVocabulary(model, tokens) as compact_tokens:`` swaps the small table in and
    returns the captions re-indexed into it; on exit the trained rows go back into the full table
    (unused rows keep their initial values), so the saved model is a plain open_clip ``CLIP``. The
    re-indexing keeps the tokens' order, so the end-of-text token is still each caption's highest
    id, which is how open_clip's default ``argmax`` pooling finds it.
    """

    def __init__(self, model, tokens: torch.Tensor) -> None:
        if getattr(model, "text_pool_type", "argmax") != "argmax":
            raise ValueError(f"CompactVocabulary needs argmax text pooling, got {model.text_pool_type!r}")
        self.model, self.tokens = model, tokens
        self.used = torch.unique(tokens)  # sorted

    def __enter__(self) -> torch.Tensor:
        self.full = self.model.token_embedding
        small = torch.nn.Embedding(len(self.used), self.full.embedding_dim)
        with torch.no_grad():
            small.weight.copy_(self.full.weight[self.used])
        self.model.token_embedding = small
        return torch.searchsorted(self.used, self.tokens)

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            self.full.weight[self.used] = self.model.token_embedding.weight
        self.model.token_embedding = self.full


def train_digit_clip(
    train: dict[str, torch.Tensor],
    class_names: list[str],
    epochs: int,
    batch_size: int,
    lr: float,
    width: int,
    layers: int,
    embed_dim: int,
    seed: int,
    max_shift: int = 2,
    progress: bool = True,
    templates: tuple[str, ...] = DIGIT_TEMPLATES,
    hflip: bool = False,
    pad: str | None = None,
    compact_vocabulary: bool = True,
    patch_grid: int = 2,
    optimizer: str = "muon",
    muon_lr: float = 8e-3,
):
    """Train the dataset CLIP on captions ``templates`` x ``class_names`` (the caption names).

    ``hflip`` adds random horizontal flips, ``pad`` is :func:`random_shift`'s border fill (default:
    ``replicate`` for colour images, photos having no black background, else ``constant``).
    ``compact_vocabulary`` trains only the token-embedding rows the captions use
    (:class:`CompactVocabulary`: the same result, a cheaper step); ``patch_grid`` is
    :func:`arch_config`'s. ``optimizer``: ``muon`` (Muon at ``muon_lr`` for the transformer blocks'
    matrices, AdamW at ``lr`` for the rest) or ``adamw``. Returns
    (model, tokenizer, preprocess, arch, seconds).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 5)
    x_all = to_model_range(train["images"])
    y_all = train["labels"]
    pad = pad or ("replicate" if x_all.shape[1] == 3 else "constant")
    prompts = class_prompts(class_names, templates)
    captions = [p for row in prompts for p in row]
    arch = arch_config(x_all.shape[-1], width, layers, embed_dim, caption_tokens(captions), patch_grid)
    model, tokenizer, preprocess = build(arch)
    tokens = tokenizer(captions)  # [K*T, L]
    with ExitStack() as stack:
        if compact_vocabulary:
            tokens = stack.enter_context(CompactVocabulary(model, tokens))
        opt = make_optimizer(model, optimizer, lr, muon_lr)  # after the vocabulary swap, so it steps the small table
        seconds = _fit(model, preprocess, tokens, len(prompts[0]), x_all, y_all, epochs, batch_size, opt, g, max_shift, hflip, pad, progress)
    model.eval()
    return model, tokenizer, preprocess, arch, seconds


def train_step(model, preprocess, opt, loss_fn, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """One optimizer step of the contrastive loss on images ``x`` (model range) and their captions'
    tokens ``text``; returns the loss."""
    img_f, txt_f, scale = model(to_clip_input(x, preprocess), text)
    loss = loss_fn(img_f, txt_f, scale)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, 4.6052)  # as in open_clip's training: scale <= 100
    return loss


def one_cycle(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """The one-cycle schedule (10% warm-up, then cosine down), each param group peaking at its own
    rate: Muon's and AdamW's."""
    peaks = [group["lr"] for group in opt.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peaks, total_steps=total_steps, pct_start=0.1)


def _fit(model, preprocess, tokens, n_t, x_all, y_all, epochs, batch_size, opt, g, max_shift, hflip, pad, progress) -> float:
    """The CLIP training loop: captions ``tokens[label * n_t + template]``; returns its seconds."""
    from open_clip.loss import ClipLoss

    steps_per_epoch = max(1, len(y_all) // batch_size)
    total = steps_per_epoch * epochs
    sched = one_cycle(opt, total)
    loss_fn = ClipLoss()
    model.train()
    t0 = time.perf_counter()
    bar = progress_bar(total=total, desc="train digit-clip", disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(len(y_all), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            y = y_all[idx]
            x = random_shift(x_all[idx], max_shift, g, pad)
            if hflip:
                x = random_hflip(x, g)
            template = torch.randint(0, n_t, (len(y),), generator=g)
            loss = train_step(model, preprocess, opt, loss_fn, x, tokens[y * n_t + template])
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return time.perf_counter() - t0


def save_digit_clip(
    path: str | Path, model, arch: dict, preprocess: dict, class_names: list[str], meta: dict,
    templates: tuple[str, ...] = DIGIT_TEMPLATES,
) -> None:
    save_atomic(
        {
            "format": FORMAT_VERSION,
            "kind": "digit-clip",
            "model": model.state_dict(),
            "arch": arch,
            "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess.items()},
            "class_names": class_names,
            "templates": list(templates),
            "config": meta.get("config", {}),
            "meta": {k: v for k, v in meta.items() if k != "config"},
        },
        path,
    )


def load_digit_clip(path: str | Path, expect_classes: list[str] | None = None):
    """-> (model in eval mode, tokenizer, preprocess).

    ``expect_classes``: the caption names of the current dataset; a model trained on other classes
    (another dataset) is refused rather than silently judging with the wrong vocabulary.
    """
    obj = load_file(path, "digit-clip model (run the train_clip stage)")
    if obj.get("kind") != "digit-clip":
        raise CheckpointError(f"{path}: not a digit-clip model")
    if expect_classes is not None and list(obj.get("class_names", [])) != list(expect_classes):
        trained = ", ".join(map(str, obj.get("class_names", [])[:3]))
        raise CheckpointError(
            f"{path}: trained on other classes ({trained}, ...) than this dataset's "
            f"({', '.join(expect_classes[:3])}, ...); run the train_clip stage"
        )
    model, tokenizer, _ = build(obj["arch"])
    model.load_state_dict(obj["model"])
    preprocess = {k: tuple(v) if isinstance(v, list) else v for k, v in obj["preprocess"].items()}
    return model.eval(), tokenizer, preprocess


def judge_from_model(model, tokenizer, preprocess, device="cpu") -> ClipJudge:
    return ClipJudge("digit-clip", model.eval(), tokenizer, preprocess, torch.device(device))
