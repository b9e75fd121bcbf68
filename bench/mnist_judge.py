"""Independent judges for the benchmarks: a small CNN trained on a dataset's full real training set.

``--dataset mnist`` (the default; 60k digits), ``fashion-mnist`` (60k clothing images) or ``cifar10``
(50k colour images; ../shared/data/cifar10/cifar10.npz, cached as .npy), read from ../shared/data. A
benchmark tool, not the product's judge (the product uses CLIP). Trained once and cached in
bench/.cache/ (mnist_cnn.pt, fashion-mnist_cnn.pt, cifar10_cnn.pt). Gives judged accuracy (overall, per
class) and a Frechet distance in its penultimate-layer feature space against the real test images.

    python bench/mnist_judge.py            # trains if needed, prints its accuracy on the test set
    python bench/mnist_judge.py --data-floor 200   # + the FD of 2,000 of the default's training digits
    python bench/mnist_judge.py --dataset fashion-mnist   # the Fashion-MNIST judge and its test accuracy
    python bench/mnist_judge.py --dataset cifar10         # the CIFAR-10 judge (three stages, batch norm)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import CACHE, REPO, mnist_root, shared_torchvision_root  # noqa: E402
from diffusion_core.clip_eval import frechet_distance  # noqa: E402

WEIGHTS = CACHE / "mnist_cnn.pt"
# per dataset: torchvision class (or the .npz file under ../shared/data), pixel mean and std (of its
# training set), training epochs
JUDGED = {"mnist": ("MNIST", 0.1307, 0.3081, 2), "fashion-mnist": ("FashionMNIST", 0.2860, 0.3530, 6),
          "cifar10": ("cifar10.npz", 0.4734, 0.2516, 6)}
# per dataset: input channels, image size, stage widths, batch norm (the grey sets keep the network
# their cached weights were trained as)
SHAPES = {"mnist": (1, 28, (32, 64), False), "fashion-mnist": (1, 28, (32, 64), False), "cifar10": (3, 32, (32, 64, 128), True)}
# CIFAR-10 in one lossless .npz (its Keras layout): ../shared, or where BENCH_CIFAR_NPZ says (bench/gpu.sh cifar10)
SHARED_CIFAR = Path(os.environ.get("BENCH_CIFAR_NPZ", REPO.parent / "shared" / "data" / "cifar10" / "cifar10.npz")).resolve()


def weights_path(dataset: str) -> Path:
    return WEIGHTS if dataset == "mnist" else CACHE / f"{dataset}_cnn.pt"


class CNN(nn.Module):
    """Stages of two 3x3 convolutions (+ batch norm) and ReLU, each halving the size by max-pooling,
    then a 128-wide feature layer (the FD's feature space) and the class head."""

    def __init__(self, in_channels: int = 1, size: int = 28, widths: tuple[int, ...] = (32, 64), batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(ch, width, 3, padding=1), *([nn.BatchNorm2d(width)] if batch_norm else []), nn.ReLU()]
                ch = width
            layers.append(nn.MaxPool2d(2))
            size //= 2
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(ch * size * size, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.features(x))


def load_cifar10(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10's real training or test images (uint8 [N, 3, 32, 32]) and labels, from
    ../shared/data/cifar10/cifar10.npz (LZMA, ~10 s), cached in bench/.cache/cifar10 as .npy."""
    split = "train" if train else "test"
    cache = CACHE / "cifar10"
    x_path, y_path = cache / f"x_{split}.npy", cache / f"y_{split}.npy"
    if not (x_path.is_file() and y_path.is_file()):
        if not SHARED_CIFAR.is_file():
            raise SystemExit(f"{SHARED_CIFAR} not found: the CIFAR-10 benchmarks need it there")
        cache.mkdir(parents=True, exist_ok=True)
        with np.load(SHARED_CIFAR) as f:
            for part in ("train", "test"):
                np.save(cache / f"x_{part}.npy", f[f"x_{part}"].transpose(0, 3, 1, 2).copy())
                np.save(cache / f"y_{part}.npy", f[f"y_{part}"])
    return torch.from_numpy(np.load(x_path)), torch.from_numpy(np.load(y_path)).long()


def load_real(train: bool, dataset: str = "mnist") -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset's real training or test images (uint8 [N, C, H, W]) and labels, from ../shared."""
    import torchvision

    if dataset == "cifar10":
        return load_cifar10(train)
    cls = getattr(torchvision.datasets, JUDGED[dataset][0])
    root = mnist_root() if dataset == "mnist" else shared_torchvision_root(dataset, JUDGED[dataset][0])
    ds = cls(str(root), train=train, download=False)
    return ds.data[:, None].clone(), ds.targets.clone()


def load_mnist(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return load_real(train, "mnist")


def prep(images_uint8: torch.Tensor, dataset: str = "mnist") -> torch.Tensor:
    _, mean, std, _ = JUDGED[dataset]
    x = images_uint8.float() / 255.0
    return (x - mean) / std


def make_cnn(dataset: str) -> CNN:
    channels, size, widths, batch_norm = SHAPES[dataset]
    return CNN(channels, size, widths, batch_norm)


def train_judge(epochs: int | None = None, seed: int = 0, dataset: str = "mnist") -> CNN:
    torch.manual_seed(seed)
    epochs = epochs or JUDGED[dataset][3]
    x, y = load_real(True, dataset)
    colour = x.shape[1] == 3
    model = make_cnn(dataset)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    steps = epochs * (len(y) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(len(y) // 128):
            idx = perm[i * 128 : (i + 1) * 128]
            xb = x[idx]
            # small random shifts: generated digits are not always centred like MNIST's
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            if colour and torch.rand((), generator=g) < 0.5:  # colour photos: mirror images are as real
                xb = xb.flip(3)
            loss = F.cross_entropy(model(prep(xb, dataset)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    print(f"trained the {dataset} judge in {time.time() - t0:.0f}s", file=sys.stderr)
    model.dataset = dataset
    return model.eval()


def get_judge(dataset: str = "mnist") -> CNN:
    """The cached judge of ``dataset`` (trained and cached the first time)."""
    model, path = make_cnn(dataset), weights_path(dataset)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.dataset = dataset
        return model.eval()
    model = train_judge(dataset=dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


@torch.no_grad()
def judge(model: CNN, images_uint8: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (predicted class [N], penultimate features [N, 128])."""
    if images_uint8.dim() == 3:
        images_uint8 = images_uint8[:, None]
    preds, feats = [], []
    for chunk in torch.split(images_uint8, batch):
        f = model.features(prep(chunk, getattr(model, "dataset", "mnist")))
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(preds), torch.cat(feats)


def digit_accuracies(pred: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Judged accuracy of each digit present in ``labels``, in digit order."""
    return [float((pred[labels == c] == c).float().mean()) for c in range(10) if (labels == c).any()]


_REAL_CACHE: dict = {}


def quality(images_uint8: torch.Tensor, labels: torch.Tensor, model: CNN | None = None, dataset: str = "mnist") -> dict:
    """Judged accuracy (overall, worst digit), FD to as many real test digits, and the real-vs-real FD.

    ``fd`` / ``fd_real_vs_real``: against one fixed draw of ``n`` random test digits, the floor one
    random draw of ``n`` training digits (every table in docs/results/). ``fd_all_test`` /
    ``fd_all_test_floor``: against all 10,000 test digits, so no draw of the reference moves it, the
    floor ``n`` training digits with the generated set's own count of each digit (docs/results/data.md#the-real-reference-set: the
    random draw moves a set's FD by up to 5 points, and a class-balanced real set is nearer the
    test digits than a random one).
    """
    model = model or get_judge(dataset)
    dataset = getattr(model, "dataset", dataset)
    pred, feat = judge(model, images_uint8)
    labels = labels.long()
    per = digit_accuracies(pred, labels)
    n = len(labels)
    real_sets = _real_features(model, dataset)
    g = torch.Generator().manual_seed(0)
    real = real_sets["test"][torch.randperm(len(real_sets["test"]), generator=g)[:n]]
    other = real_sets["train"][torch.randperm(len(real_sets["train"]), generator=g)[:n]]
    return {
        "accuracy": float((pred == labels).float().mean()),
        "worst_digit": int(np.argmin(per)),
        "worst_digit_accuracy": float(min(per)),
        "fd": frechet_distance(feat, real),
        "fd_real_vs_real": frechet_distance(other, real),
        "fd_all_test": frechet_distance(feat, real_sets["test"]),
        "fd_all_test_floor": _all_test_floor(labels, real_sets),
        "n": n,
        "pred": pred,
    }


def _real_features(model: CNN, dataset: str) -> dict:
    """The judge's features of all real test images and of the first 10,000 training images (cached)."""
    if dataset not in _REAL_CACHE:
        xt, _ = load_real(False, dataset)
        xtr, ytr = load_real(True, dataset)
        _REAL_CACHE[dataset] = {"test": judge(model, xt)[1], "train": judge(model, xtr[:10000])[1], "train_labels": ytr[:10000]}
    return _REAL_CACHE[dataset]


def _all_test_floor(labels: torch.Tensor, real_sets: dict) -> float:
    """``fd_all_test``'s floor for a generated set with ``labels``; it depends only on their count of
    each class, so a benchmark's many sets of one size share one computation."""
    counts = tuple(torch.bincount(labels.long(), minlength=10).tolist())
    key = "all_test_floor", counts
    if key not in real_sets:
        real_sets[key] = frechet_distance(real_sets["train"][same_digits(real_sets["train_labels"], labels)], real_sets["test"])
    return real_sets[key]


def same_digits(pool_labels: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Indices into ``pool_labels`` with as many of each digit as ``labels`` holds (a fixed draw)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(labels.long(), minlength=10)
    picked = []
    for c in range(10):
        pool = (pool_labels == c).nonzero().flatten()
        if int(counts[c]) > len(pool):
            raise ValueError(f"{int(counts[c])} generated digits of class {c}, but only {len(pool)} real ones to match them")
        picked.append(pool[torch.randperm(len(pool), generator=g)[: int(counts[c])]])
    return torch.cat(picked)


def training_digits_quality(per_class: int) -> dict:
    """``quality()`` of the default model's own training digits (the mnist-5k train split, ``per_class``
    of each digit, as the generated sets are): the FD a model that reproduced its training set would reach."""
    from diffusion_core.data import build_splits
    from diffusion_core.data import take_per_class

    return quality(*take_per_class(build_splits("mnist-5k")["train"], per_class, 10))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", choices=sorted(JUDGED), default="mnist")
    ap.add_argument("--data-floor", type=int, default=0, metavar="PER_CLASS",
                    help="also judge PER_CLASS mnist-5k training digits of each class like a generated set (mnist only)")
    ap.add_argument("--model", type=Path, help="judge this saved pipeline (model.pt) instead: per_class images of each class at each --draw")
    ap.add_argument("--draw", action="append", default=[], help="with --model: SAMPLER:STEPS@W/LO-HI (bench/seeds.py's format)")
    ap.add_argument("--per-class", type=int, default=200, help="with --model: images drawn per class")
    args = ap.parse_args()
    if args.model:  # a kept model (bench/time_to_quality.py --keep DIR: DIR/model.pt) at other sampler settings
        from bench.common import machine, md_table
        from bench.seeds import judge_one, parse_draw

        if not args.model.is_file() or not args.draw or args.per_class < 1:
            raise SystemExit(f"--model {args.model}: needs an existing model.pt, at least one --draw and --per-class >= 1")
        for spec in args.draw:
            parse_draw(spec)
        print(f"Machine: {machine()}\nCommand: `python bench/mnist_judge.py --dataset {args.dataset} --model MODEL"
              + "".join(f" --draw {d}" for d in args.draw) + f" --per-class {args.per_class}`\n")
        print(md_table(judge_one(args.model, args.draw, args.per_class, seed=0, dataset=args.dataset)))
        raise SystemExit(0)
    m = get_judge(args.dataset)
    x, y = load_real(False, args.dataset)
    pred, _ = judge(m, x)
    per = " ".join(f"{a:.3f}" for a in digit_accuracies(pred, y))
    print(f"{args.dataset} judge accuracy on the {len(y):,} real test images: {(pred == y).float().mean():.4f} (per class {per})")
    if args.data_floor:
        q = training_digits_quality(args.data_floor)
        print(f"mnist-5k training digits, {q['n']} ({args.data_floor} per class): judged {q['accuracy']:.4f}, worst digit "
              f"{q['worst_digit']} {q['worst_digit_accuracy']:.3f}, FD {q['fd']:.2f} to as many test digits "
              f"(real-vs-real floor {q['fd_real_vs_real']:.2f})")
