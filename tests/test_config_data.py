import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_core.config import Config, ConfigError, config_from_dict, load_config
from diffusion_core.data import DataError, build_splits, load_split, save_splits, stratified_split, to_model_range, DATASETS


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"train": {"lr": -1}}, "train.lr must be > 0, got -1"),
        ({"train": {"batch_size": 0}}, "train.batch_size must be > 0"),
        ({"train": {"lrr": 0.1}}, "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ({"trian": {}}, "unknown key 'trian' (did you mean 'train'?)"),
        ({"train": {"epochs": "ten"}}, "train.epochs must be an integer"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number"),
        ({"data": {"source": "imagenet"}}, "data.source must be one of"),
        ({"sample": {"guidance_scale": -1}}, "sample.guidance_scale must be >= 0"),
        ({"sample": {"guidance_interval": [0.6, 0.2]}}, "sample.guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1"),
        ({"sample": {"guidance_interval": [0.5]}}, "sample.guidance_interval must be [lo, hi]"),
        ({"sample": {"timestep_spacing": "leading"}}, "sample.timestep_spacing must be one of trailing, logsnr, karras, got 'leading'"),
        ({"sample": {"steps": 2000}}, "sample.steps must be in [1, diffusion.timesteps=1000]"),
        ({"sample": {"sampler": "euler"}}, "sample.sampler must be one of"),
        ({"model": {"attention_resolutions": [5]}}, "model.attention_resolutions: 5 is not a resolution"),
        ({"model": {"channel_mult": [1, 2, 2, 2]}}, "cannot be halved 3 times"),
        ({"model": {"patch_size": 3}}, "model.patch_size (3) must divide the image size 28"),
        ({"model": {"patch_size": 0}}, "model.patch_size must be > 0"),
        ({"clip": {"digit_clip_patch_grid": 3}}, "clip.digit_clip_patch_grid must be > 0 and divide the image size 28, got 3"),
        ({"data": {"source": "cifar10"}, "model": {"attention_resolutions": [8]}, "clip": {"digit_clip_patch_grid": 7}},
         "clip.digit_clip_patch_grid must be > 0 and divide the image size 32, got 7"),
        ({"model": {"conditioning": "film"}}, "model.conditioning must be one of add, silu_add, scale_shift, got 'film'"),
        ({"model": {"channel_mult": "1,2"}}, "model.channel_mult must be a list"),
        ({"diffusion": {"schedule": "quadratic"}}, "diffusion.schedule must be"),
        ({"diffusion": {"prediction": "x0"}}, "diffusion.prediction must be"),
        ({"diffusion": {"t_sampling": "lognormal"}}, "diffusion.t_sampling must be one of"),
        ({"diffusion": {"t_logit_std": 0}}, "diffusion.t_logit_std must be > 0"),
        ({"train": {"device": "tpu"}}, "train.device must be"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"train": {"ema_decay": 1.0}}, "train.ema_decay must be in [0, 1)"),
        ({"train": {"adam_beta2": 1.0}}, "train.adam_beta2 must be in (0, 1), got 1.0"),
        ({"train": {"optimizer": "sgd"}}, "train.optimizer must be one of adamw, muon, got 'sgd'"),
        ({"train": {"muon_lr": 0.0}}, "train.muon_lr must be > 0, got 0.0"),
        ({"clip": {"digit_clip_optimizer": "sgd"}}, "clip.digit_clip_optimizer must be one of adamw, muon, got 'sgd'"),
        ({"clip": {"digit_clip_muon_lr": -1.0}}, "clip.digit_clip_muon_lr must be > 0, got -1.0"),
        ({"train": {"muon_momentum": 1.0}}, "train.muon_momentum must be in [0, 1), got 1.0"),
    ],
)
def test_bad_config_names_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_defaults_valid_and_params_yaml_loads(tmp_path):
    cfg = config_from_dict({})
    assert cfg == Config()
    assert cfg.flat()["train.lr"] == cfg.train.lr
    p = tmp_path / "params.yaml"
    p.write_text("seed: 3\ntrain:\n  lr: 1e-3\n")
    cfg = load_config(p, overrides={"sample.steps": 10})
    assert cfg.seed == 3 and cfg.train.lr == 1e-3 and cfg.sample.steps == 10
    p.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def params_read_by(source: str) -> set[str]:
    """The params.yaml keys a stage script reads: ``cfg.seed``, ``cfg.GROUP.KEY``, and ``ALIAS.KEY``
    after ``ALIAS = cfg.GROUP`` (also in tuple assignments such as ``w, s = cfg.sweep, cfg.sample``)."""
    import ast

    groups = {f.name for f in dataclasses.fields(Config)} - {"seed"}
    is_group = lambda v: isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name) and v.value.id == "cfg" and v.attr in groups  # noqa: E731
    tree = ast.parse(source)
    alias = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            target, value = node.targets[0], node.value
            pairs = zip(target.elts, value.elts) if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) else [(target, value)]
            alias.update({t.id: v.attr for t, v in pairs if isinstance(t, ast.Name) and is_group(v)})
    used = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        if is_group(node.value):
            used.add(f"{node.value.attr}.{node.attr}")
        elif isinstance(node.value, ast.Name) and node.value.id in alias:
            used.add(f"{alias[node.value.id]}.{node.attr}")
        elif isinstance(node.value, ast.Name) and node.value.id == "cfg" and node.attr == "seed":
            used.add("seed")
    return used


def test_every_param_a_stage_reads_is_declared_for_it_in_dvc_yaml():
    """Otherwise `dvc exp run -S KEY=...` leaves that stage's outputs stale (sweep once drew with
    sample.timestep_spacing without declaring it)."""
    import re

    import yaml

    root = Path(__file__).resolve().parents[1]
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    checked = 0
    for name, stage in stages.items():
        module = re.fullmatch(r"python -m stages\.(\w+)", stage["cmd"]).group(1)
        declared = set(stage.get("params", []))
        used = params_read_by((root / "stages" / f"{module}.py").read_text())
        missing = sorted(k for k in used if k not in declared and k.split(".")[0] not in declared)
        assert not missing, f"dvc.yaml stage {name!r} does not declare {missing}"
        checked += len(used)
    assert checked > 30  # the scan finds the reads (a broken scan would pass vacuously)
    assert params_read_by("w, s = cfg.sweep, cfg.sample\nx = s.timestep_spacing + w.per_class + cfg.seed + cfg.train.lr") == {
        "sample.timestep_spacing", "sweep.per_class", "seed", "train.lr"}


def test_stratified_split_is_deterministic_and_disjoint():
    labels = np.repeat(np.arange(10), 100)
    a = stratified_split(labels, {"train": 0.0, "val": 0.1, "test": 0.2}, seed=5)
    b = stratified_split(labels, {"train": 0.0, "val": 0.1, "test": 0.2}, seed=5)
    c = stratified_split(labels, {"train": 0.0, "val": 0.1, "test": 0.2}, seed=6)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["val"], c["val"])
    assert len(set(a["train"]) | set(a["val"]) | set(a["test"])) == 1000
    assert np.bincount(labels[a["val"]]).tolist() == [10] * 10
    assert len(a["test"]) == 200


def test_mnist_5k_splits_and_round_trip(mnist5k, tmp_path):
    sizes = {k: len(v["labels"]) for k, v in mnist5k.items()}
    assert sizes == {"train": 4000, "val": 500, "test": 500}
    x = to_model_range(mnist5k["train"]["images"])
    assert x.shape[1:] == (1, 28, 28) and x.min() == -1 and x.max() == 1
    stats = save_splits(mnist5k, tmp_path, DATASETS["mnist-5k"], seed=0)
    assert stats["splits"]["val"]["per_class"] == [50] * 10
    back = load_split(tmp_path, "test")
    assert torch.equal(back["images"], mnist5k["test"]["images"])
    (tmp_path / "val.pt").write_bytes(b"garbage")
    with pytest.raises(DataError, match="val.pt"):
        load_split(tmp_path, "val")


def write_fake_mnist(root) -> dict:
    """ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte as torchvision's MNIST reads them (uncompressed
    idx files, written by the Fashion-MNIST tests' writer); each image carries its label in pixel (0, 0) and its
    index in pixels (27, 26) and (27, 27) (base 256), and pixel (0, 1) != (1, 0), so a shuffle, a transpose or a label mix-up shows."""
    from test_datasets import _idx

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    truth = {}
    for split, per_class, seed in (("train", 30, 1), ("t10k", 7, 2)):
        labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = np.random.default_rng(seed + 10).integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels * 20
        images[:, 0, 1], images[:, 1, 0] = 250, 3
        images[:, 27, 26], images[:, 27, 27] = np.divmod(np.arange(len(labels)), 256)
        _idx(raw / f"{split}-images-idx3-ubyte", images)
        _idx(raw / f"{split}-labels-idx1-ubyte", labels)
        truth[split] = (images, labels)
    return truth


def test_mnist_through_torchvision_reads_exactly_the_idx_files(tmp_path):
    """Runs without ../shared: fake idx files in torchvision's layout go through the real torchvision
    MNIST loader; the images and labels come back exactly, in file order, as uint8 [N, 1, 28, 28] and int64."""
    truth = write_fake_mnist(tmp_path / "mnist")
    raw = DATASETS["mnist"].loader(str(tmp_path / "mnist"), False)
    for split, images, labels in (("train", raw.train_images, raw.train_labels), ("t10k", raw.test_images, raw.test_labels)):
        want_images, want_labels = truth[split]
        assert images.dtype == np.uint8 and images.shape == (len(want_labels), 1, 28, 28)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images[:, 0], want_images)
        np.testing.assert_array_equal(labels, want_labels.astype(np.int64))
    splits = build_splits("mnist", root=str(tmp_path / "mnist"), seed=0, val_fraction=0.1, download=False)
    assert torch.equal(splits["test"]["images"][:, 0], torch.from_numpy(truth["t10k"][0]))
    assert torch.equal(splits["test"]["labels"], torch.from_numpy(truth["t10k"][1]).long())
    assert {k: len(v["labels"]) for k, v in splits.items()} == {"train": 270, "val": 30, "test": 70}
    assert torch.bincount(splits["val"]["labels"]).tolist() == [3] * 10
    train_images, kept = truth["train"][0], {}
    for split in ("train", "val"):  # every image keeps its own label, and train and val share none
        x, y = splits[split]["images"][:, 0].numpy(), splits[split]["labels"].numpy()
        assert (x[:, 0, 0] == y * 20).all()
        index = x[:, 27, 26].astype(int) * 256 + x[:, 27, 27]
        np.testing.assert_array_equal(x, train_images[index])
        kept[split] = set(index.tolist())
    assert not kept["train"] & kept["val"] and len(kept["train"] | kept["val"]) == 300


def test_a_truncated_mnist_file_is_a_clear_error(tmp_path):
    """torchvision raises ValueError on a cut-short idx file: one line naming data.root, not a traceback."""
    write_fake_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01")  # cut after the magic
    with pytest.raises(DataError, match="MNIST files missing or corrupted"):
        build_splits("mnist", root=str(tmp_path / "mnist"), download=False)


def test_full_mnist_through_torchvision_offline(mnist_root):
    """The real files, where ../shared holds them: the official sizes and per-class counts."""
    splits = build_splits("mnist", root=str(mnist_root), seed=0, val_fraction=0.1, download=False, limit=6000)
    assert len(splits["test"]["labels"]) == 10000
    assert abs(len(splits["val"]["labels"]) - 6000) <= 10  # 10% per class, rounded
    assert abs(len(splits["train"]["labels"]) - 6000) <= 10
    assert splits["test"]["images"].shape[1:] == (1, 28, 28)
    assert torch.bincount(splits["test"]["labels"]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_full_mnist_missing_files_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        build_splits("mnist", root=str(tmp_path), download=False)


def test_params_yaml_holds_the_documented_defaults():
    from conftest import REPO

    assert load_config(REPO / "params.yaml") == Config()


def test_every_documented_dvc_exp_run_is_a_valid_config():
    """Each `dvc exp run ... -S key=value` in the README and docs/ (presets, examples) names keys
    that exist, with values the config accepts: a preset a user copies must start."""
    import re
    import shlex

    import yaml

    repo = Path(__file__).resolve().parents[1]
    commands = []
    for md in [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]:
        text = md.read_text()
        inline = re.findall(r"`(dvc exp run [^`]*)`", text.replace("\n", " "))  # prose wraps its spans
        blocks = [line for block in re.findall(r"```\w*\n(.*?)```", text, re.S)
                  for line in block.replace("\\\n", " ").splitlines() if line.startswith("dvc exp run")]
        commands += [(md.name, line) for line in inline + blocks if " -S " in line and "..." not in line]  # "...": prose
    assert len(commands) >= 5, commands  # the presets of docs/datasets.md and docs/scaling.md at least
    for name, line in commands:
        words = shlex.split(line, comments=True)
        overrides = {}
        for flag, value in zip(words, words[1:]):
            if flag == "-S":
                key, _, raw = value.partition("=")
                overrides[key] = yaml.safe_load(raw)
        try:
            load_config(repo / "params.yaml", overrides)
        except ConfigError as exc:
            pytest.fail(f"{name}: `{line}`: {exc}")
