"""Data-parallel training (torchrun, DistributedDataParallel) on CPU with the gloo backend.

Two processes with the global batch ``train.batch_size`` compute the same maths as one process with
that batch: each rank takes positions rank, rank + 2, ... of every global batch and of the noise
drawn for it, and DDP averages the gradients. Only the order of float additions differs (per-rank
means then the all-reduce average, instead of one mean over the batch), which is ~1e-7 relative per
step; Adam and 20 steps amplify it a little. The tolerance ``ATOL = 1e-4`` on weights and losses is
~1/1000 of how far training moves the weights (checked below), so a wrong shard (a rank seeing the
wrong images or noise, gradients summed instead of averaged, a missing all-reduce) fails it by orders
of magnitude.
"""

import csv
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, tiny_config
from diffusion_core.config import ConfigError
from diffusion_core.data import DATASETS
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.data import EpochShardSampler, epoch_permutation
from diffusion_core.trainer import Trainer
from tiny_params import write_tiny_params

ATOL = 1e-4
INFO = {"channels": 1, "size": 28, "class_names": list(DATASETS["mnist-5k"].class_names)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# -- the maths of sharding, without processes ------------------------------------------------------


def test_rank_shards_of_a_batch_are_the_single_process_batch():
    n, seed, world, b = 103, 7, 4, 5  # n not divisible: drop_last like DistributedSampler
    one = EpochShardSampler(n, seed)
    one.set_epoch(3)
    assert torch.equal(one.indices(), epoch_permutation(n, seed, 3))  # single process: unchanged order
    shards = []
    for rank in range(world):
        s = EpochShardSampler(n, seed, world, rank)
        s.set_epoch(3)
        assert list(s) == s.indices().tolist() and len(s) == n // world
        shards.append(s.indices())
    perm = epoch_permutation(n, seed, 3)
    for k in range((n // world) // b):  # k-th local batch of every rank = k-th global batch of world*b
        local = torch.stack([sh[k * b : (k + 1) * b] for sh in shards], dim=1).flatten()
        assert torch.equal(local, perm[k * b * world : (k + 1) * b * world])


def test_sharded_noise_is_the_single_process_noise():
    diff = GaussianDiffusion(timesteps=50, num_classes=10)
    x0 = torch.randn(12, 1, 8, 8)
    y = torch.randint(0, 10, (12,))
    seen = {}

    def spy(name):
        def model(x_t, t, y_):
            seen[name] = (x_t, t, y_)
            return torch.zeros_like(x_t)

        return model

    full = diff(spy("full"), x0, y, 0.5, torch.Generator().manual_seed(3))
    parts = [diff(spy(r), x0[r::3], y[r::3], 0.5, torch.Generator().manual_seed(3), shard=(r, 3)) for r in range(3)]
    for r in range(3):
        for got, want in zip(seen[r], seen["full"]):
            assert torch.equal(got, want[r::3])
    assert torch.allclose(sum(parts) / 3, full)


def test_random_flips_are_drawn_for_the_global_batch():
    """Datasets with flips (cifar10): rank r flips its images exactly as one process flips the
    positions r, r + world, ... of the global batch."""
    x = torch.randn(12, 3, 4, 4)

    def augment(rank, world, images):
        tr = Trainer.__new__(Trainer)  # only what _augment reads; no process group needed
        tr.hflip, tr.rank, tr.world, tr.flip_gen = True, rank, world, torch.Generator().manual_seed(5)
        return tr._augment(images)

    full = augment(0, 1, x)
    assert not torch.equal(full, x) and not torch.equal(full, x.flip(-1))  # some flipped, some not
    for r in range(3):
        assert torch.equal(augment(r, 3, x[r::3]), full[r::3])


def test_global_batch_not_divisible_by_the_processes_is_one_line_naming_the_param(mnist5k, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    train = {k: v[:96] for k, v in mnist5k["train"].items()}
    val = {k: v[:32] for k, v in mnist5k["val"].items()}
    with pytest.raises(ConfigError, match=r"train.batch_size is the global batch .* processes \(3\), got 16"):
        Trainer(tiny_config(), train, val, INFO, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


# -- two real processes -------------------------------------------------------------------------

WORKER = """
import os, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from diffusion_core.data import build_splits
from diffusion_core.trainer import Trainer
torch.set_num_threads(1)
splits = build_splits("mnist-5k", seed=0)
train = {{k: v[:{n}] for k, v in splits["train"].items()}}
val = {{k: v[:64] for k, v in splits["val"].items()}}
# every rank gets its own output folder: rank 1's must stay empty
out = Path({base!r}) / f"rank{{os.environ['RANK']}}"
tr = Trainer(tiny_config(**{groups!r}), train, val, {info!r}, out, progress=False)
res = tr.fit(resume=False)
assert tr.world == 2 and torch.distributed.is_initialized()
if tr.is_main:
    torch.save({{"model": tr.model.state_dict(), "ema": tr.ema.state_dict(), "loss": [r["loss"] for r in res.history.train]}}, out / "final.pt")
tr.close()
assert not torch.distributed.is_initialized()
"""


def test_two_processes_match_one_and_only_rank_0_writes(mnist5k, tmp_path):
    groups = {"train": {"epochs": 2, "batch_size": 32, "cond_drop_prob": 0.3, "checkpoint_every": 3}}
    n = 128  # 4 global batches of 32 per epoch, 8 steps
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests"), n=n, base=str(tmp_path), groups=groups, info=INFO))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*TORCHRUN, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (tmp_path / "rank1").exists()
    assert {p.name for p in (tmp_path / "rank0").iterdir()} == {"checkpoint.pt", "model.pt", "grids", "final.pt"}
    ddp = torch.load(tmp_path / "rank0" / "final.pt", weights_only=True)

    train = {k: v[:n] for k, v in mnist5k["train"].items()}
    val = {k: v[:64] for k, v in mnist5k["val"].items()}
    single = Trainer(tiny_config(**groups), train, val, INFO, tmp_path / "single", progress=False)
    init = {k: v.clone() for k, v in single.model.state_dict().items()}
    losses = [r["loss"] for r in single.fit(resume=False).history.train]
    assert len(losses) == len(ddp["loss"]) == 8
    moved = max_diff(single.model.state_dict(), init)
    assert moved > 20 * ATOL, moved  # training moved the weights far beyond the tolerance the two runs must agree to
    assert max_diff(single.model.state_dict(), ddp["model"]) < ATOL
    assert max_diff(single.ema.state_dict(), ddp["ema"]) < ATOL
    assert max(abs(a - b) for a, b in zip(losses, ddp["loss"])) < ATOL
    ckpt = torch.load(tmp_path / "rank0" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]["ranks"]) == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


# -- the real train stage under torchrun ---------------------------------------------------------


def project(dst: Path) -> None:
    for f in ["params.yaml", "dvc.yaml", *[str(p.relative_to(REPO)) for p in (REPO / "stages").glob("*.py")],
              *[str(p.relative_to(REPO)) for p in (REPO / "diffusion_core").glob("*.py")]]:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst / f)
    write_tiny_params(REPO / "params.yaml", dst / "params.yaml")  # 320 images, global batch 32: 20 steps


def env_for(d: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(d), "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


def stage(cmd: list[str], d: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=d, env=env_for(d), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


def mlflow_runs(d: Path) -> list[str]:
    con = sqlite3.connect(d / "mlflow.db")
    try:
        return [r for (r,) in con.execute("select run_uuid from runs")]
    finally:
        con.close()


def losses(d: Path) -> list[float]:
    with open(d / "reports/plots/train_loss.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def checkpoint_step(path: Path) -> int:
    from diffusion_core.checkpoint import load_file

    try:
        return int(load_file(path, "training checkpoint")["step"])
    except Exception:  # noqa: BLE001 - not there yet
        return -1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Prepared tiny data; the train stage run once in one process and once in two."""
    root = tmp_path_factory.mktemp("ddp")
    dirs = {name: root / name for name in ("single", "ddp", "killed")}
    for d in dirs.values():
        project(d)
    stage([sys.executable, "-m", "stages.prepare"], dirs["single"])
    for name in ("ddp", "killed"):
        shutil.copytree(dirs["single"] / "data", dirs[name] / "data")
    out = {"single": stage([sys.executable, "-m", "stages.train"], dirs["single"])}
    out["ddp"] = stage([*TORCHRUN, "-m", "stages.train"], dirs["ddp"])
    return dirs, out


@pytest.mark.slow
def test_torchrun_stage_matches_single_process_with_the_same_global_batch(runs):
    dirs, out = runs
    s, d = dirs["single"], dirs["ddp"]
    ws = torch.load(s / "models/model.pt", weights_only=True)["model"]
    wd = torch.load(d / "models/model.pt", weights_only=True)["model"]
    cs = torch.load(s / "models/checkpoint.pt", weights_only=True)
    cd = torch.load(d / "models/checkpoint.pt", weights_only=True)
    assert cs["step"] == cd["step"] == 20 and cd["world_size"] == 2
    print(f"DDP vs single: max |dw| model {max_diff(cs['model'], cd['model']):.2e}, EMA {max_diff(ws, wd):.2e}, "
          f"loss {max(abs(a - b) for a, b in zip(losses(s), losses(d))):.2e}")
    assert max_diff(cs["model"], cd["model"]) < ATOL
    assert max_diff(ws, wd) < ATOL  # the EMA weights in the model file
    assert len(losses(d)) == 20
    assert max(abs(a - b) for a, b in zip(losses(s), losses(d))) < ATOL
    import json

    ms, md = (json.loads((x / "reports/metrics/train.json").read_text()) for x in (s, d))
    assert md["processes"] == 2 and ms["processes"] == 1 and md["precision"] == "fp32"
    assert abs(ms["final_val_loss"] - md["final_val_loss"]) < ATOL


@pytest.mark.slow
def test_torchrun_stage_logs_and_writes_from_rank_0_only(runs):
    dirs, out = runs
    d = dirs["ddp"]
    assert len(mlflow_runs(d)) == 1
    assert out["ddp"].stdout.count("trained 20 steps on 2 processes") == 1, out["ddp"].stdout
    assert sorted(p.name for p in (d / "models").iterdir()) == ["checkpoint.pt", "grids", "model.pt", "run.json"]
    assert sorted(p.name for p in (d / "models/grids").iterdir()) == ["epoch_001.png", "epoch_002.png"]
    con = sqlite3.connect(d / "mlflow.db")
    try:
        (run_id,) = mlflow_runs(d)
        procs = con.execute("select value from metrics where run_uuid=? and key='train/processes'", (run_id,)).fetchall()
        steps = con.execute("select count(*) from metrics where run_uuid=? and key='train/loss'", (run_id,)).fetchone()
    finally:
        con.close()
    assert procs == [(2.0,)] and steps == (20,)


@pytest.mark.slow
def test_killed_torchrun_stage_resumes_in_two_processes_and_in_one(runs, tmp_path):
    dirs, _ = runs
    k = dirs["killed"]
    ckpt = k / "models" / "checkpoint.pt"
    proc = subprocess.Popen([*TORCHRUN, "-m", "stages.train"], cwd=k, env=env_for(k), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while checkpoint_step(ckpt) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, at once
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    killed_at = checkpoint_step(ckpt)
    assert 8 <= killed_at < 20 and not (k / "models" / "model.pt").exists()
    shutil.copy2(ckpt, tmp_path / "checkpoint.pt")

    res = stage([*TORCHRUN, "-m", "stages.train"], k)
    assert "resuming from" in res.stdout and res.stdout.count("trained 20 steps on 2 processes") == 1
    assert len(mlflow_runs(k)) == 2  # the killed run and the resumed one: one per torchrun, not per rank
    d = dirs["ddp"]
    wk = torch.load(k / "models/model.pt", weights_only=True)["model"]
    wd = torch.load(d / "models/model.pt", weights_only=True)["model"]
    print(f"DDP killed at step {killed_at} and resumed vs uninterrupted DDP: max |dw| {max_diff(wk, wd):.2e}")
    for key in wd:  # same processes, same reduction order: the same bits
        assert torch.equal(wk[key], wd[key]), key
    assert losses(k) == losses(d)

    # the 2-process checkpoint resumed by a single process (no "module." prefixes, rank 0's RNG)
    from diffusion_core.config import load_config
    from diffusion_core.data import load_split

    cfg = load_config(k / "params.yaml")
    data = k / "data" / "prepared"
    one = Trainer(cfg, load_split(data, "train"), load_split(data, "val"), INFO, tmp_path, progress=False)
    assert one.world == 1 and one.resume_mismatch() is None
    res1 = one.fit(resume=True)
    assert res1.steps == 20 and len(res1.history.train) == 20
    cd = torch.load(d / "models/checkpoint.pt", weights_only=True)
    print(f"DDP checkpoint resumed in one process vs uninterrupted DDP: max |dw| {max_diff(one.model.state_dict(), cd['model']):.2e}")
    assert max_diff(one.model.state_dict(), cd["model"]) < ATOL
    assert max_diff(one.ema.module.state_dict(), wd) < ATOL
