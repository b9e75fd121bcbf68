"""Checkpoints: written atomically, read with ``weights_only=True``, checked against the config.

Two kinds of file:

* a *training checkpoint* (``models/checkpoint.pt``) holds everything needed to resume exactly:
  model, EMA, optimizer, LR scheduler, step, epoch, RNG states, loss history and the config;
* a *model file* (``models/model.pt``) holds what sampling needs: the EMA weights, the config that
  built the network and the dataset geometry.

Both are plain dicts of tensors and Python scalars, so ``torch.load(..., weights_only=True)`` reads
them and a crafted pickle is refused.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from diffusion_core.config import Config, ConfigError, build_diffusion, build_unet, config_from_dict
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.runtime import use_channels_last
from diffusion_core.unet import UNet
from diffusion_core.errors import CheckpointError  # noqa: F401 - raised here, caught by the stages

FORMAT_VERSION = 1


# The modules whose code decides what training computes. A checkpoint written by other code is not
# resumed (the run starts over), even when the config is the same.
TRAINING_CODE = ("config", "data", "schedule", "diffusion", "unet", "samplers", "trainer", "optim", "runtime", "checkpoint")


def code_fingerprint() -> str:
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in TRAINING_CODE:
        h.update(name.encode())
        h.update((here / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write leaves the previous file intact: the rename is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_file(path: str | Path, kind: str) -> dict[str, Any]:
    """Load a checkpoint or model file safely; a one-line error names the file when it is bad."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {kind} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, crafted pickle, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = reason if len(reason) <= 200 else reason[:200].rsplit(" ", 1)[0] + " ..."
        raise CheckpointError(f"{path}: not a readable {kind} ({reason})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_VERSION or "config" not in obj:
        raise CheckpointError(f"{path}: not a {kind} written by this version of diffusion_core")
    return obj


# Keys added after files were first written, with the value such a file meant by leaving them out
# where that is not today's default (otherwise the dataclass default fills them in).
FORMER_DEFAULTS = {
    ("model", "patch_size"): 1,  # the U-Net ran at full resolution
    ("model", "conditioning"): "add",  # the blocks added the embedding linearly
    ("diffusion", "t_sampling"): "uniform",  # training drew t uniformly
}


def config_of(obj: dict[str, Any], path: str | Path) -> Config:
    raw = obj["config"]
    if isinstance(raw, dict):
        raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
        for (group, key), value in FORMER_DEFAULTS.items():
            if isinstance(raw.get(group), dict):
                raw[group].setdefault(key, value)
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its stored config is invalid ({exc})") from None


def check_same_architecture(stored: Config, current: Config, path: str | Path) -> None:
    """Refuse a file whose network or diffusion settings differ from the current config."""
    for group in ("model", "diffusion"):
        a, b = getattr(stored, group).__dict__, getattr(current, group).__dict__
        for key in a:
            if a[key] != b[key]:
                raise CheckpointError(
                    f"{path}: was trained with {group}.{key}={a[key]!r} but params say {b[key]!r}"
                )
    if stored.data.source != current.data.source:
        raise CheckpointError(
            f"{path}: was trained on data.source={stored.data.source!r} but params say {current.data.source!r}"
        )


def build_model(cfg: Config, data_info: dict[str, Any]) -> tuple[UNet, GaussianDiffusion]:
    num_classes = len(data_info["class_names"])
    model = build_unet(cfg.model, data_info["channels"], data_info["size"], num_classes)
    diffusion = build_diffusion(cfg.diffusion, num_classes)
    return model, diffusion


def save_model(path: str | Path, ema_state: dict[str, torch.Tensor], cfg: Config, data_info: dict[str, Any], meta: dict[str, Any]) -> None:
    save_atomic(
        {"format": FORMAT_VERSION, "model": {k: v.contiguous() for k, v in ema_state.items()}, "config": cfg.to_dict(), "data": data_info, "meta": meta},
        path,
    )


def load_model(path: str | Path, device: str | torch.device = "cpu", expect: Config | None = None):
    """Read a model file -> (model in eval mode, diffusion, config, data_info, meta)."""
    obj = load_file(path, "model file")
    cfg = config_of(obj, path)
    if expect is not None:
        check_same_architecture(cfg, expect, path)
    model, diffusion = build_model(cfg, obj["data"])
    try:
        model.load_state_dict(obj["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the network ({str(exc).splitlines()[0]})") from None
    device = torch.device(device)
    model.to(device).set_channels_last(use_channels_last("auto", device, None))  # sampling runs in float32
    return model.eval(), diffusion.to(device), cfg, obj["data"], obj.get("meta", {})
