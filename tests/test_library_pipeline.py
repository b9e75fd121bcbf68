"""The library as the README shows it (DiffusionPipeline), and the resume rule that only the groups
that change training decide whether a killed training resumes."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch

from diffusion_core.config import TRAINING_GROUPS, ConfigError, apply_overrides, config_from_dict, declared_fields
from diffusion_core.data import DATASETS
from diffusion_core.pipeline import DiffusionPipeline
from diffusion_core.trainer import Trainer

from conftest import TINY_MODEL, tiny_config

REPO = Path(__file__).resolve().parents[1]
INFO = {"channels": 1, "size": 28, "class_names": list(DATASETS["mnist-5k"].class_names)}


def small(splits, n_train=64, n_val=32):
    return ({k: v[:n_train] for k, v in splits["train"].items()}, {k: v[:n_val] for k, v in splits["val"].items()})


@pytest.fixture(scope="module")
def trained(mnist5k, tmp_path_factory) -> Path:
    """A tiny model trained for a few steps, written as models/model.pt of a project folder."""
    root = tmp_path_factory.mktemp("project")
    cfg = tiny_config(train={"epochs": 1})
    Trainer(cfg, *small(mnist5k), INFO, root / "models", progress=False).fit(resume=False)
    return root


def test_the_readme_python_example_runs_as_written(trained):
    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    assert len(block.strip().splitlines()) <= 15
    cwd = os.getcwd()
    os.chdir(trained)
    try:
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    assert scope["sevens"].shape == (16, 1, 28, 28)
    assert (trained / "sevens.png").stat().st_size > 0


def test_pipeline_draws_by_name_or_index_reproducibly_with_every_sampler(trained):
    pipe = DiffusionPipeline.from_pretrained(trained / "models" / "model.pt")
    assert pipe.class_names[7] == "seven" and pipe.image_shape == (1, 28, 28)
    a = pipe(["seven", 7, "3"], sampler="ddim", steps=4, guidance_scale=1.0, seed=3, precision="fp32")
    b = pipe(torch.tensor([7, 7, 3]), sampler="ddim", steps=4, guidance_scale=1.0, seed=3, precision="fp32", batch_size=1)
    assert a.shape == (3, 1, 28, 28) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a[:2], a[:2]) and not torch.equal(a[0], a[1])  # one generator: each image its own noise
    assert torch.allclose(a, b, atol=1e-5)  # batch size does not change the draw
    assert not torch.equal(a, pipe([7, 7, 3], sampler="ddim", steps=4, guidance_scale=1.0, seed=4, precision="fp32"))
    for sampler in ("ddpm", "dpm++2m"):
        assert pipe([0, 1], sampler=sampler, steps=3, seed=0).shape == (2, 1, 28, 28)
    traj = pipe.trajectory([1, 2], 3, sampler="dpm++2m", steps=4, seed=0)
    assert traj.x_t.shape == (3, 2, 1, 28, 28) and traj.fraction.tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="a class must be a name"):
        pipe(["unicorn"])
    with pytest.raises(ValueError, match="index in \\[0, 9\\]"):
        pipe([10])


def other_value(key: str, value, f: dataclasses.Field):
    """Valid-looking alternatives to ``value`` for ``key``, most likely first."""
    choices = f.metadata.get("choices")
    if choices:
        return [c for c in choices if c != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2, value * 2 + 2, max(value - 1, 0)]
    if isinstance(value, float):
        return [value / 2, value + 0.1, 1.0, 0.3]
    if isinstance(value, list):
        numeric = bool(value) and isinstance(value[0], (int, float))
        return [value[:-1], value + value[-1:], [v / 2 for v in value] if numeric else value[::-1], [v + 1 for v in value] if numeric else [],
                value + ["dataset-clip"]]
    return [value + "x", "dataset-clip"]


def test_a_killed_training_resumes_after_any_change_outside_the_training_groups(mnist5k, tmp_path):
    cfg = tiny_config(train={"epochs": 2, "checkpoint_every": 2})
    train, val = small(mnist5k)
    Trainer(cfg, train, val, INFO, tmp_path, progress=False).fit(resume=False, stop_after=2)  # "killed" after step 2
    base = cfg.to_dict()
    changed = []
    for key, _, f in declared_fields():
        if key.split(".")[0] in TRAINING_GROUPS:
            continue
        for value in (v for v in other_value(key, cfg.flat()[key], f) if v != cfg.flat()[key]):
            try:
                other = config_from_dict(apply_overrides(cfg.to_dict(), {key: value}))
            except ConfigError:
                continue
            assert other.flat()[key] != cfg.flat()[key]
            tr = Trainer(other, train, val, INFO, tmp_path, progress=False)
            assert tr.resume_mismatch() is None, key
            changed.append(key)
            break
        else:
            pytest.fail(f"no valid other value tried for {key}")
    groups = {k.split(".")[0] for k in changed}
    assert groups == {"sample", "clip", "sweep", "report"}
    # the check can fail: a training key does stop the resume, and the resumed run goes on from step 2
    lr = config_from_dict(apply_overrides(base, {"train.lr": 0.01}))
    assert "train.lr=0.002" in Trainer(lr, train, val, INFO, tmp_path, progress=False).resume_mismatch()
    sweep = config_from_dict(apply_overrides(cfg.to_dict(), {"sweep.per_class": 3}))
    res = Trainer(sweep, train, val, INFO, tmp_path, progress=False).fit(resume=True)
    assert [r["step"] for r in res.history.train] == list(range(1, 9)) and res.steps == 8


def test_apply_overrides_sets_dotted_keys_and_refuses_a_key_below_a_value():
    raw = apply_overrides({"train": {"lr": 1}}, {"train.epochs": 3, "seed": 2, "model.channel_mult": [1]})
    assert raw == {"train": {"lr": 1, "epochs": 3}, "seed": 2, "model": {"channel_mult": [1]}}
    with pytest.raises(ConfigError, match="cannot set seed.x"):
        apply_overrides({"seed": 0}, {"seed.x": 1})
    assert config_from_dict({"model": dict(TINY_MODEL)}, {"train.epochs": 7}).train.epochs == 7
