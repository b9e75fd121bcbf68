import gzip
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
SHARED_FASHION = REPO.parent / "shared" / "data" / "fashion-mnist" / "FashionMNIST" / "raw"


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


def _unpacked(tmp_path_factory, shared: Path, raw_folder: str) -> Path:
    """A torchvision root whose ``raw_folder`` holds the uncompressed files of ``shared``'s *.gz."""
    if not shared.is_dir():
        pytest.skip(f"{shared} not present")
    root = tmp_path_factory.mktemp(shared.parent.name if shared.name == "raw" else shared.name)
    raw = root / raw_folder
    raw.mkdir(parents=True)
    for gz in shared.glob("*.gz"):
        with gzip.open(gz, "rb") as src, open(raw / gz.name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """Full MNIST laid out as torchvision expects (ROOT/MNIST/raw), from ../shared, no network."""
    return _unpacked(tmp_path_factory, SHARED_MNIST, "MNIST/raw")


@pytest.fixture(scope="session")
def real_fashion_root(tmp_path_factory) -> Path:
    """The real Fashion-MNIST laid out as torchvision expects (ROOT/FashionMNIST/raw), from ../shared."""
    return _unpacked(tmp_path_factory, SHARED_FASHION, "FashionMNIST/raw")


@pytest.fixture(scope="session")
def mnist5k():
    from diffusion_core.data import build_splits

    return build_splits("mnist-5k", seed=0)


TINY_MODEL = {"base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [14], "num_heads": 2, "norm_groups": 4}


def tiny_config(**groups):
    from diffusion_core.config import config_from_dict

    # device cpu: the tests assert what auto resolves to on a CPU (layout, precision); a test of the
    # GPU path asks for train.device=cuda (seen on a lent GPU: auto picked CUDA and a CPU test failed)
    raw = {"model": dict(TINY_MODEL), "diffusion": {"timesteps": 100}, "train": {"device": "cpu", "epochs": 2, "compile": False, "batch_size": 16, "grid_steps": 5, "grid_per_class": 1, "warmup_steps": 5, "checkpoint_every": 1000}}
    for k, v in groups.items():
        raw.setdefault(k, {}).update(v) if isinstance(v, dict) else raw.__setitem__(k, v)
    return config_from_dict(raw)
