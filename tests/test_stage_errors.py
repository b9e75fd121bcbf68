"""Bad input to the stages: refused before any work, one line naming the key or file, exit 2,
and nothing already produced is touched."""

import importlib
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import REPO

BASE = yaml.safe_load((REPO / "params.yaml").read_text())


def params_with(tmp_path, dotted=None, value=None, raw=None):
    from diffusion_core.config import apply_overrides

    data = apply_overrides(yaml.safe_load(yaml.safe_dump(BASE)), {dotted: value} if dotted else None)
    path = tmp_path / "params.yaml"
    path.write_text(raw if raw is not None else yaml.safe_dump(data))
    return path


# Every output dvc.yaml lists (outs, metrics, plots) for every stage, as a file a failed stage
# must leave alone: an earlier run's results. A folder out is stood for by files in it.
OUTPUTS = [
    "data/prepared/train.pt", "data/prepared/val.pt", "data/prepared/test.pt", "data/prepared/stats.json",
    "models/model.pt", "models/run.json", "models/checkpoint.pt", "models/grids/epoch_001.png", "models/digit-clip.pt",
    "samples/samples.npz", "samples/grid.png", "samples/trajectory.npz", "samples/run.json",
    "evaluation/digit-clip/per_class.csv", "sweep/results.csv",
    "reports/metrics/train.json", "reports/metrics/train_clip.json", "reports/metrics/sample.json", "reports/metrics/evaluate.json",
    "reports/plots/train_loss.csv", "reports/plots/val_loss.csv", "reports/plots/per_class_accuracy.csv",
    "reports/plots/recognizability.csv", "reports/plots/guidance_sweep.csv",
    "reports/report.md", "reports/figures/x.png", "reports/runs.md",
]


def dvc_outputs() -> set[str]:
    """The paths dvc.yaml names as outs, metrics or plots of any stage."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {next(iter(o)) if isinstance(o, dict) else o
            for st in stages.values() for kind in ("outs", "metrics", "plots") for o in st.get(kind, [])}


def test_the_workspace_stands_for_every_output_dvc_yaml_lists():
    """Each dvc.yaml output is one of OUTPUTS or a folder holding some (a new output must be added here)."""
    for out in dvc_outputs():
        assert out in OUTPUTS or any(p.startswith(out + "/") for p in OUTPUTS), f"{out} has no placeholder in OUTPUTS"


def snapshot(root):
    """Every file (with the sha256 of its bytes) and every folder under root."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A project folder holding every stage's earlier outputs, each of which must survive every failure."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the tracking store lands in tmp_path (mlflow.db)
    for rel in OUTPUTS:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"earlier output: " + rel.encode())
    return tmp_path


def invoke(stage, args):
    app = importlib.import_module(f"stages.{stage}").app
    return CliRunner().invoke(app, args)


def write_bad_samples(path, kind):
    if kind == "dtype":
        np.savez(path, images=np.zeros((10, 28, 28), np.float32), labels=np.zeros(10, np.int64))
    elif kind == "shape":
        np.savez(path, images=np.zeros((10, 32, 32), np.uint8), labels=np.zeros(10, np.int64))
    elif kind == "labels":
        np.savez(path, images=np.zeros((10, 28, 28), np.uint8), labels=np.zeros(9, np.int64))
    else:
        path.write_bytes(b"not an npz")


from diffusion_core.config import ModelConfig  # noqa: E402

CASES = [
    # (stage, params change, extra setup, expected words in the error)
    ("prepare", ("data.source", "imagenet"), None, "data.source must be one of"),
    ("prepare", ("data.sourse", "mnist"), None, "unknown key 'data.sourse' (did you mean 'data.source'?)"),
    ("prepare", ("data.val_fraction", 1.5), None, "data.val_fraction must be in (0, 1)"),
    ("train", ("train.lr", -1), None, "train.lr must be > 0, got -1"),
    ("train", ("train.lr", 0), None, "train.lr must be > 0, got 0"),
    ("train", ("train.batch_size", 0), None, "train.batch_size must be > 0"),
    ("train", ("train.epochs", "ten"), None, "train.epochs must be an integer"),
    ("train", ("model.attention_resolutions", [5]), None, "model.attention_resolutions: 5 is not a resolution"),
    ("train", ("model.norm_groups", 5), None, "model.norm_groups (5) must divide"),
    ("train", ("diffusion.schedule", "sigmoid"), None, "diffusion.schedule must be"),
    ("train", ("train.device", "tpu"), None, "train.device must be"),
    ("train", ("train.per_class", 5), None, "unknown key 'train.per_class'"),  # sweep.per_class, in the wrong group
    ("evaluate", ("sample.real_per_class", 50), None, "unknown key 'sample.real_per_class'"),  # clip.real_per_class
    ("sweep", ("sample.guidance_scales", [1.0, 3.0]), None, "unknown key 'sample.guidance_scales'"),  # sweep.guidance_scales
    ("train", None, "no-data", "stats.json: missing"),
    ("train", None, "truncated-checkpoint", "checkpoint.pt: not a readable training checkpoint"),  # killed mid-write: never overwritten
    ("sample", ("sample.guidance_scale", -1.0), None, "sample.guidance_scale must be >= 0"),
    ("sample", ("sample.steps", 5000), None, "sample.steps must be in [1, diffusion.timesteps=1000]"),
    ("sample", ("sample.sampler", "euler"), None, "sample.sampler must be one of"),
    ("sample", None, "no-model", "models/model.pt: model file not found"),
    ("sample", None, "truncated-model", "model.pt: not a readable model file"),
    ("sample", None, "pickle-model", "model.pt: not a readable model file"),
    ("sample", None, "other-config-model", f"was trained with model.base_channels=8 but params say {ModelConfig().base_channels}"),
    ("evaluate", ("clip.models", ["ViT-Z-99:foo"]), None, "unknown open_clip architecture 'ViT-Z-99'"),
    ("evaluate", ("clip.models", ["clip-vit"]), None, "clip.models[0] must be 'digit-clip'"),
    ("evaluate", ("clip.models", ["ViT-B-32:/no/such/weights.bin"]), None, "weights file /no/such/weights.bin not found"),
    ("evaluate", None, "no-digit-clip", "digit-clip.pt: digit-clip model not found"),
    ("evaluate", None, "cifar-samples", "samples.npz: 'images' must be [N, 28, 28] or [N, 1, 28, 28], got [10, 32, 32, 3]"),
    ("evaluate", None, "cifar-samples-nchw", "samples.npz: 'images' must be [N, 28, 28] or [N, 1, 28, 28], got [10, 3, 32, 32]"),
    ("sweep", None, "other-config-model", f"was trained with model.base_channels=8 but params say {ModelConfig().base_channels}"),
    ("sweep", None, "truncated-model", "model.pt: not a readable model file"),
    ("prepare", None, "bad-yaml", "not valid YAML"),
    ("prepare", None, "wrong-top-type", "seed must be an integer"),
]


@pytest.mark.parametrize("stage,change,setup,expected", CASES, ids=[f"{c[0]}-{c[2] or c[1][0]}" for c in CASES])
def test_bad_input_is_refused_early_and_clearly(workspace, stage, change, setup, expected):
    tmp = workspace
    raw = None
    if setup == "bad-yaml":
        raw = "train: [1, 2\n"
    elif setup == "wrong-top-type":
        raw = "seed: [1]\n"
    params = params_with(tmp, *(change or (None, None)), raw=raw)
    if setup == "no-data":
        shutil.rmtree(tmp / "data")
    elif setup == "no-model":
        (tmp / "models" / "model.pt").unlink()
    elif setup == "no-digit-clip":
        (tmp / "models" / "digit-clip.pt").unlink()
    elif setup in ("truncated-model", "pickle-model", "other-config-model"):
        from diffusion_core.checkpoint import build_model, save_model
        from diffusion_core.config import config_from_dict

        if setup == "truncated-model":
            (tmp / "models" / "model.pt").write_bytes(b"PK\x03\x04 truncated")
        elif setup == "pickle-model":
            class Evil:
                def __reduce__(self):
                    return (print, ("pwned",))

            torch.save({"format": 1, "config": {}, "model": Evil()}, tmp / "models" / "model.pt")
        else:
            cfg = config_from_dict({"model": {"base_channels": 8, "norm_groups": 4}})
            info = {"channels": 1, "size": 28, "class_names": [str(i) for i in range(10)]}
            model, _ = build_model(cfg, info)
            save_model(tmp / "models" / "model.pt", model.state_dict(), cfg, info, {})
    elif setup == "truncated-checkpoint":  # real prepared splits (a few images), a checkpoint cut short
        from diffusion_core.data import DATASETS, build_splits, save_splits

        small = {k: {n: t[:20] for n, t in v.items()} for k, v in build_splits("mnist-5k", seed=0).items()}
        save_splits(small, tmp / "data" / "prepared", DATASETS["mnist-5k"], seed=0)
        (tmp / "models" / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    elif setup in ("cifar-samples", "cifar-samples-nchw"):  # prepared MNIST, samples of another dataset (CIFAR-10's 32x32 RGB)
        stats = {"source": "mnist", "channels": 1, "size": 28, "class_names": [str(i) for i in range(10)]}
        (tmp / "data" / "prepared" / "stats.json").write_text(json.dumps(stats))
        shape = (10, 32, 32, 3) if setup == "cifar-samples" else (10, 3, 32, 32)
        np.savez(tmp / "samples" / "samples.npz", images=np.zeros(shape, np.uint8), labels=np.arange(10, dtype=np.int64))
    removed = {"no-data": [r for r in OUTPUTS if r.startswith("data/")], "no-model": ["models/model.pt"],
               "no-digit-clip": ["models/digit-clip.pt"]}.get(setup, [])
    assert [r for r in OUTPUTS if not (tmp / r).is_file()] == removed  # every other output is there to be kept
    before = snapshot(tmp)
    result = invoke(stage, ["--params", str(params)])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert expected in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    after = snapshot(tmp)
    assert not (tmp / "mlflow.db").exists() and not (tmp / "mlruns").exists()
    assert sorted(after.keys() - before.keys()) == [], "new files"
    assert sorted(before.keys() - after.keys()) == [], "removed files"
    assert [k for k in before if before[k] != after[k]] == [], "changed files"


@pytest.mark.parametrize("kind,expected", [("dtype", "'images' must be uint8"), ("shape", "must be [N, 28, 28]"),
                                           ("labels", "'labels' must be int64 [N] matching"), ("garbage", "not a samples file")])
def test_bad_samples_file_is_refused(tmp_path, kind, expected):
    from diffusion_core.data import DataError
    from stages.evaluate import load_samples

    path = tmp_path / "samples.npz"
    write_bad_samples(path, kind)
    with pytest.raises(DataError, match="samples.npz") as err:
        load_samples(path, 10, 1, 28)
    assert expected in str(err.value)


def test_unreachable_tracking_server_fails_fast_and_names_the_variable(monkeypatch):
    import socket
    import time

    from diffusion_core import tracking

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    t0 = time.time()
    with pytest.raises(tracking.TrackingError, match=f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}: tracking server not reachable"):
        tracking.setup()
    assert time.time() - t0 < 5


def test_queued_experiment_copies_track_to_the_original_repository(tmp_path, monkeypatch):
    from diffusion_core import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    queued = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    assert tracking.repo_root(queued) == tmp_path / "repo"
    assert tracking.tracking_uri(queued) == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    assert tracking.repo_root(tmp_path / "other") == tmp_path / "other"
